"""Scale: gateway RSS per idle session and per attached client; event-loop latency while idle.

The daemon runs as its own process (``gatewayd``); its RSS is read from ``/proc/<pid>/status``.
Sessions run the fake codex: each is created by a client that connects, initializes and leaves
(the session stays, as after a reconnectable disconnect). Clients are then attached round-robin
to those sessions and kept open. Event-loop latency is the round trip of ``GET /healthz`` on a
kept-alive connection (an HTTP request served by the same ``trio.run``), sampled every 10 ms,
compared with the same probe before any session existed.

A fake codex child is a Python process of ~20 MiB private memory: the number of sessions is
capped by the memory available (a note says so when it is).
"""

from __future__ import annotations

import math
import time

import httpx2
import trio

from gateway_tests.bench import client
from gateway_tests.bench.common import (
    KIB,
    MIB,
    Options,
    Results,
    mem_available_bytes,
    percentile,
    private_bytes,
    rss_bytes,
)
from gateway_tests.bench.procs import Gateway, fake_codex_bin, running_gateway

SECTION = "scale"
WARM_SESSIONS = 2
CONNECT_CONCURRENCY = 16
MEMORY_MARGIN = 4 << 30
SETTLE_SECONDS = 3.0
# What a fake codex child is taken to cost when none of them can be measured.
ASSUMED_CHILD_BYTES = 30 * MIB


async def _healthz_latency(gateway: Gateway, samples: int) -> tuple[float, float]:
    values = []
    async with httpx2.AsyncClient(timeout=10) as http:
        await http.get(f"{gateway.http_url}/healthz")
        for _ in range(samples):
            started = time.perf_counter()
            response = await http.get(f"{gateway.http_url}/healthz")
            values.append(time.perf_counter() - started)
            response.raise_for_status()
            await trio.sleep(0.01)
    return percentile(values, 0.5) * 1e3, percentile(values, 0.99) * 1e3


async def _open_sessions(gateway: Gateway, names: list[str]) -> None:
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def one(name: str) -> None:
        async with limiter, client.connect(gateway.ws_url, gateway.headers(name)) as ws:
            await client.initialize(ws)

    with trio.fail_after(1200):
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)


def _child_private_bytes(gateway: Gateway, names: list[str]) -> float | None:
    """Mean private memory of the newest children; ``None`` when none can be read (a child
    that has gone, or whose ``/proc`` entry cannot be read, reads as 0 and is left out)."""
    sizes = []
    for name in names[-20:]:
        try:
            size = private_bytes(gateway.child(name)["pid"])
        except (KeyError, OSError, ValueError):
            continue
        if size > 0:
            sizes.append(size)
    return sum(sizes) / len(sizes) if sizes else None


async def _settle() -> None:
    await trio.sleep(SETTLE_SECONDS)


async def run(opts: Options, results: Results) -> None:
    work = opts.work_dir / SECTION
    levels = [20, 50] if opts.quick else [200, 1000]
    wanted_clients = 200 if opts.quick else 1000
    probe_samples = 100 if opts.quick else 300
    codex_bin = fake_codex_bin(work / "bin")
    async with running_gateway(
        work / "gateway",
        codex_bin,
        CXG_MAX_SESSIONS="5000",
        CXG_IDLE_SHUTDOWN="24h",
    ) as gateway:
        names = [f"warm-{i}" for i in range(WARM_SESSIONS)]
        await _open_sessions(gateway, names)
        await _settle()
        base_rss = rss_bytes(gateway.pid)
        base_p50, base_p99 = await _healthz_latency(gateway, probe_samples)
        print(
            f"    {WARM_SESSIONS} sessions: RSS {base_rss / MIB:.1f} MiB, /healthz p50 "
            f"{base_p50:.2f} ms p99 {base_p99:.2f} ms",
            flush=True,
        )
        results.add(SECTION, "gateway RSS, baseline (2 sessions)", "MiB", [base_rss / MIB])
        results.add(SECTION, "/healthz p50, 2 sessions", "ms", [base_p50])
        results.add(SECTION, "/healthz p99, 2 sessions", "ms", [base_p99])
        largest = WARM_SESSIONS
        for level in levels:
            target = level
            per_child = _child_private_bytes(gateway, names)
            if per_child is None:
                per_child = ASSUMED_CHILD_BYTES
                results.note(
                    f"scale: no child's private memory could be read before {level} sessions; "
                    f"assumed {ASSUMED_CHILD_BYTES // MIB} MiB each"
                )
            affordable = largest + int((mem_available_bytes() - MEMORY_MARGIN) / (per_child * 1.2))
            if affordable < target:
                target = max(largest, affordable)
                results.note(
                    f"scale: {level} sessions need ~{(level - largest) * per_child / 2**30:.1f} "
                    f"GiB more for fake codex children ({per_child / MIB:.0f} MiB private each); "
                    f"measured {target} sessions instead"
                )
            if target <= largest:
                continue
            new = [f"idle-{i}" for i in range(len(names), target)]
            started = time.monotonic()
            await _open_sessions(gateway, new)
            names += new
            elapsed = time.monotonic() - started
            await _settle()
            rss = rss_bytes(gateway.pid)
            per_session = (rss - base_rss) / (len(names) - WARM_SESSIONS)
            p50, p99 = await _healthz_latency(gateway, probe_samples)
            print(
                f"    {len(names)} sessions (+{len(new)} in {elapsed:.0f} s): RSS "
                f"{rss / MIB:.1f} MiB, {per_session / KIB:.0f} KiB per session, /healthz p50 "
                f"{p50:.2f} ms p99 {p99:.2f} ms",
                flush=True,
            )
            label = f"{len(names)} sessions"
            results.add(SECTION, f"gateway RSS, {label}", "MiB", [rss / MIB])
            results.add(
                SECTION,
                f"RSS per idle session ({label})",
                "KiB",
                [per_session / KIB],
                "(RSS - baseline) / added sessions",
            )
            results.add(SECTION, f"/healthz p50, {label} idle", "ms", [p50])
            results.add(SECTION, f"/healthz p99, {label} idle", "ms", [p99])
            results.add(
                SECTION, f"/healthz p99 ratio, {label} / 2 sessions", "ratio", [p99 / base_p99]
            )
            largest = len(names)
        per_session_figure = results.find(SECTION, f"RSS per idle session ({largest} sessions)")
        if per_session_figure is not None:
            results.add(
                SECTION,
                f"RSS per idle session (largest run, {largest} sessions)",
                "KiB",
                per_session_figure.values,
            )

        # Attached clients, round-robin over the sessions, all kept open.
        clients = wanted_clients
        before = rss_bytes(gateway.pid)
        attached = 0
        all_attached = trio.Event()
        release = trio.Event()
        connecting = trio.Semaphore(CONNECT_CONCURRENCY * 2)

        async def hold(name: str) -> None:
            nonlocal attached
            await connecting.acquire()
            released = False
            try:
                async with client.connect(gateway.ws_url, gateway.headers(name)) as ws:
                    await client.initialize(ws)
                    connecting.release()
                    released = True
                    attached += 1
                    if attached == clients:
                        all_attached.set()
                    await release.wait()
            finally:
                if not released:
                    connecting.release()

        with trio.fail_after(1200):
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    nursery.start_soon(hold, names[i % len(names)])
                await all_attached.wait()
                await _settle()
                rss = rss_bytes(gateway.pid)
                per_client = (rss - before) / clients
                p50, p99 = await _healthz_latency(gateway, probe_samples)
                print(
                    f"    {clients} attached clients: RSS {rss / MIB:.1f} MiB, "
                    f"{per_client / KIB:.0f} KiB per client, /healthz p50 {p50:.2f} ms "
                    f"p99 {p99:.2f} ms",
                    flush=True,
                )
                release.set()
        label = f"{clients} clients on {len(names)} sessions"
        results.add(SECTION, f"gateway RSS, {label}", "MiB", [rss / MIB])
        results.add(
            SECTION,
            f"RSS per attached client ({label})",
            "KiB",
            [per_client / KIB],
            "(RSS with clients - RSS before) / clients",
        )
        results.add(SECTION, f"/healthz p50, {label} idle", "ms", [p50])
        results.add(SECTION, f"/healthz p99, {label} idle", "ms", [p99])
        results.add(SECTION, f"/healthz p99 ratio, {label} / 2 sessions", "ratio", [p99 / base_p99])
        if not math.isfinite(per_client):
            results.note("scale: no clients attached")
        print(f"    draining {len(names)} sessions …", flush=True)
