"""Relay benchmarks: small-request latency, attach latency, 100 connections, echo throughput.

Three paths to the *same* child process, interleaved (direct, nginx, gateway) in each of the
repetitions:

* ``direct``: the session child's own ``ws://127.0.0.1:PORT`` with its capability token (read
  from the benchmark daemon, see ``gatewayd``);
* ``nginx``: a private nginx (one worker, the config of bench-anchors.md) in front of that port;
  the client sends the child's token through it;
* ``gateway``: the daemon's WebSocket route with a workspace token.

Latency uses the real codex (``thread/read`` with bad params: a prompt ~94-byte error);
throughput uses the fake codex with ``ECHO_BINARY=1`` as the child (binary frames echoed).
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Sequence

import trio

from gateway.sessions import frames
from gateway_tests import rawws
from gateway_tests.bench import client
from gateway_tests.bench.common import (
    KIB,
    MIB,
    Options,
    Results,
    children_of,
    cpu_seconds,
    difference_values,
    percentile,
    ratio_values,
    rss_bytes,
)
from gateway_tests.bench.procs import (
    Gateway,
    fake_codex_bin,
    real_codex_bin,
    running_gateway,
    running_nginx,
)

SECTION = "relay"
PATHS = ("direct", "nginx", "gateway")
Endpoint = tuple[str, list[tuple[str, str]]]


def _endpoints(gateway: Gateway, workspace: str, nginx_port: int) -> dict[str, Endpoint]:
    child = gateway.child(workspace)
    child_headers = [("authorization", f"Bearer {child['token']}")]
    return {
        "direct": (child["url"], child_headers),
        "nginx": (f"ws://127.0.0.1:{nginx_port}/", child_headers),
        "gateway": (gateway.ws_url, gateway.headers(workspace)),
    }


async def _open_session(gateway: Gateway, workspace: str) -> None:
    async with client.connect(gateway.ws_url, gateway.headers(workspace)) as ws:
        await client.initialize(ws)


def _us(values: Sequence[float]) -> list[float]:
    return [v * 1e6 for v in values]


async def _latency(
    endpoints: dict[str, Endpoint], opts: Options, results: Results
) -> dict[str, dict[str, list[float]]]:
    count = 300 if opts.quick else 2000
    warmup = 50 if opts.quick else 200
    per_path: dict[str, dict[str, list[float]]] = {p: {"p50": [], "p99": []} for p in PATHS}
    for rep in range(opts.reps):
        for path in PATHS:
            url, headers = endpoints[path]
            async with client.connect(url, headers) as ws:
                await client.initialize(ws)
                await client.small_round_trips(ws, warmup, first_id=1)
                samples = await client.small_round_trips(ws, count, first_id=warmup + 1)
            p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
            per_path[path]["p50"].append(p50)
            per_path[path]["p99"].append(p99)
            print(
                f"    rep {rep + 1} {path:8s} round trip p50 {p50 * 1e6:7.0f} µs"
                f"  p99 {p99 * 1e6:7.0f} µs",
                flush=True,
            )
    note = f"{count} sequential thread/read round trips per repetition on one connection"
    for path in PATHS:
        for q in ("p50", "p99"):
            results.add(SECTION, f"round trip {q}, {path}", "µs", _us(per_path[path][q]), note)
    for q in ("p50", "p99"):
        gw_added = difference_values(per_path["gateway"][q], per_path["direct"][q])
        ngx_added = difference_values(per_path["nginx"][q], per_path["direct"][q])
        results.add(SECTION, f"added round trip {q}, gateway", "µs", _us(gw_added))
        results.add(SECTION, f"added round trip {q}, nginx", "µs", _us(ngx_added))
        results.add(
            SECTION,
            f"added round trip {q}, gateway / nginx",
            "ratio",
            ratio_values(gw_added, ngx_added),
            "per repetition; the target (<= 3) is on the medians",
        )
    return per_path


async def _attach(endpoints: dict[str, Endpoint], opts: Options, results: Results) -> None:
    count = 10 if opts.quick else 60
    per_path: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(opts.reps):
        samples = await client.interleaved_attaches({p: endpoints[p] for p in PATHS}, count)
        for path in PATHS:
            per_path[path].append(statistics.median(samples[path]))
            print(
                f"    rep {rep + 1} {path:8s} connect+upgrade+initialize p50 "
                f"{per_path[path][-1] * 1e3:6.2f} ms",
                flush=True,
            )
    note = f"{count} connects per path per repetition to a live session, paths in turn; p50"
    for path in PATHS:
        results.add(SECTION, f"attach p50, {path}", "ms", [v * 1e3 for v in per_path[path]], note)
    results.add(
        SECTION,
        "attach added p50, gateway",
        "ms",
        [v * 1e3 for v in difference_values(per_path["gateway"], per_path["direct"])],
        "<= 1 ms is the target",
    )
    results.add(
        SECTION,
        "attach added p50, nginx",
        "ms",
        [v * 1e3 for v in difference_values(per_path["nginx"], per_path["direct"])],
    )


async def _concurrent(
    endpoints: dict[str, Endpoint],
    opts: Options,
    results: Results,
    cpu_pids: dict[str, int],
) -> None:
    connections = 20 if opts.quick else 100
    requests = 50 if opts.quick else 200
    rates: dict[str, list[float]] = {p: [] for p in PATHS}
    p99s: dict[str, list[float]] = {p: [] for p in PATHS}
    cpu: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(opts.reps):
        for path in PATHS:
            url, headers = endpoints[path]
            samples: list[float] = []
            go = trio.Event()
            ready = 0
            all_ready = trio.Event()

            async def one(
                url: str = url,
                headers: list[tuple[str, str]] = headers,
                go: trio.Event = go,
                all_ready: trio.Event = all_ready,
                samples: list[float] = samples,
            ) -> None:
                nonlocal ready
                async with client.connect(url, headers) as ws:
                    await client.initialize(ws)
                    ready += 1
                    if ready == connections:
                        all_ready.set()
                    await go.wait()
                    samples.extend(await client.small_round_trips(ws, requests))

            with trio.fail_after(300):
                async with trio.open_nursery() as nursery:
                    for _ in range(connections):
                        nursery.start_soon(one)
                    await all_ready.wait()
                    pid = cpu_pids.get(path)
                    cpu_before = cpu_seconds(pid) if pid else 0.0
                    started = time.perf_counter()
                    go.set()
                    # The nursery ends when every connection has done its requests.
                elapsed = time.perf_counter() - started
            total = connections * requests
            rates[path].append(total / elapsed)
            p99s[path].append(percentile(samples, 0.99))
            if pid:
                cpu[path].append((cpu_seconds(pid) - cpu_before) / total * 1e6)
            print(
                f"    rep {rep + 1} {path:8s} {connections}x{requests}: "
                f"{rates[path][-1]:7.0f} req/s  p99 {p99s[path][-1] * 1e3:6.1f} ms",
                flush=True,
            )
    note = f"{connections} connections x {requests} sequential requests each, all at once"
    for path in PATHS:
        results.add(SECTION, f"{connections} connections req/s, {path}", "req/s", rates[path], note)
        results.add(
            SECTION, f"{connections} connections p99, {path}", "ms", [v * 1e3 for v in p99s[path]]
        )
    results.add(
        SECTION,
        f"{connections} connections req/s, gateway / direct",
        "ratio",
        ratio_values(rates["gateway"], rates["direct"]),
        ">= 0.70 is the target",
    )
    results.add(
        SECTION,
        f"{connections} connections req/s, nginx / direct",
        "ratio",
        ratio_values(rates["nginx"], rates["direct"]),
    )
    for path in ("gateway", "nginx"):
        if cpu[path]:
            results.add(
                SECTION,
                f"CPU per relayed request (both frames), {path}",
                "µs",
                cpu[path],
                "process CPU time during the 100-connection run / requests",
            )


async def _throughput(
    endpoints: dict[str, Endpoint], opts: Options, results: Results, cpu_pids: dict[str, int]
) -> None:
    count = 50 if opts.quick else 200
    for size, label in ((64 * KIB, "64 KiB"), (1 * MIB, "1 MiB")):
        payload = bytes(range(256)) * (size // 256)
        rates: dict[str, list[float]] = {p: [] for p in PATHS}
        cpu: dict[str, list[float]] = {p: [] for p in PATHS}
        for rep in range(opts.reps):
            for path in PATHS:
                url, headers = endpoints[path]
                async with client.connect(url, headers) as ws:
                    await client.initialize(ws)
                    await client.echo_round_trips(ws, payload, 5)
                    pid = cpu_pids.get(path)
                    cpu_before = cpu_seconds(pid) if pid else 0.0
                    seconds = await client.echo_round_trips(ws, payload, count)
                    if pid:
                        cpu[path].append((cpu_seconds(pid) - cpu_before) / (2 * count * size / MIB))
                rates[path].append(size * count / seconds / 1e6)
                print(
                    f"    rep {rep + 1} {path:8s} {label:6s} frames: "
                    f"{rates[path][-1]:7.1f} MB/s each way",
                    flush=True,
                )
        note = f"{count} binary frames of {label} echoed one at a time; MB/s each way"
        for path in PATHS:
            results.add(SECTION, f"throughput {label}, {path}", "MB/s", rates[path], note)
        for path in ("gateway", "nginx"):
            results.add(
                SECTION,
                f"throughput {label}, {path} / direct",
                "ratio",
                ratio_values(rates[path], rates["direct"]),
                "the target: the gateway's MB/s >= nginx's" if path == "gateway" else "",
            )
            if cpu[path]:
                results.add(
                    SECTION,
                    f"CPU per relayed MiB ({label} frames), {path}",
                    "ms",
                    [v * 1e3 for v in cpu[path]],
                    "process CPU time / MiB relayed (both directions counted)",
                )


def _child_port(gateway: Gateway, workspace: str) -> int:
    url: str = gateway.child(workspace)["url"]
    return int(url.removeprefix("ws://").split("/", 1)[0].rsplit(":", 1)[1])


def _nginx_worker(master_pid: int) -> int:
    workers = children_of(master_pid)
    return workers[0] if workers else master_pid


async def run(opts: Options, results: Results) -> None:
    """Latency, attach and concurrency against the real codex; throughput against the echo."""
    work = opts.work_dir / SECTION
    workspace = "bench-relay"
    print("  relay, real codex child", flush=True)
    # 100 connections of one workspace: above the default per-workspace cap, which is for
    # tenants, not for this measurement.
    async with running_gateway(
        work / "gateway-real", real_codex_bin(), CXG_MAX_CLIENTS_PER_WORKSPACE="0"
    ) as gateway:
        await _open_session(gateway, workspace)
        with running_nginx(work / "nginx-real", _child_port(gateway, workspace)) as nginx:
            endpoints = _endpoints(gateway, workspace, nginx.port)
            cpu_pids = {"gateway": gateway.pid, "nginx": _nginx_worker(nginx.process.pid)}
            await _latency(endpoints, opts, results)
            await _attach(endpoints, opts, results)
            await _concurrent(endpoints, opts, results, cpu_pids)
    print("  relay, echo child (fake codex, ECHO_BINARY=1)", flush=True)
    echo_bin = fake_codex_bin(work / "bin", ECHO_BINARY="1")
    async with running_gateway(work / "gateway-echo", echo_bin) as gateway:
        await _open_session(gateway, workspace)
        with running_nginx(work / "nginx-echo", _child_port(gateway, workspace)) as nginx:
            endpoints = _endpoints(gateway, workspace, nginx.port)
            cpu_pids = {"gateway": gateway.pid, "nginx": _nginx_worker(nginx.process.pid)}
            await _throughput(endpoints, opts, results, cpu_pids)
    print("  relay, memory under hostile loads (echo child)", flush=True)
    await _burst_memory(opts, results)


async def _burst_memory(opts: Options, results: Results) -> None:
    """Daemon RSS under hostile memory loads (issue 14): a burst of large frames, a stalled child.

    * 500 clients (100 with ``--quick``) each send one 1 MiB binary frame at once to the echo
      child and wait for the echo; peak ``VmRSS`` of the daemon during the burst and ``VmRSS``
      once the clients have left, against the start.
    * one client writes 60 MiB frames (three) to a child stopped with SIGSTOP (it reads
      nothing); peak RSS while it is held back.
    """
    work = opts.work_dir / SECTION / "memory"
    clients_n = 100 if opts.quick else 500
    echo_bin = fake_codex_bin(work / "bin", ECHO_BINARY="1")
    budget = 256 * MIB
    async with running_gateway(
        work / "gateway",
        echo_bin,
        CXG_MAX_CLIENTS_PER_WORKSPACE="0",
        CXG_WS_INFLIGHT_BUDGET=str(budget),
    ) as gateway:
        workspace = "bench-burst"
        await _open_session(gateway, workspace)
        host, port = gateway.host_port
        token = gateway.headers(workspace)[0][1].removeprefix("Bearer ")
        start = rss_bytes(gateway.pid)
        peak = start
        clients = []
        with trio.fail_after(600):
            for _ in range(clients_n):
                head, raw = await rawws.raw_connect(host, port, token)
                if not head.startswith(b"HTTP/1.1 101"):
                    raise RuntimeError(f"upgrade refused: {head[:80]!r}")
                clients.append(raw)
            blob = bytes(range(256)) * (MIB // 256)
            done = trio.Event()

            async def one(raw: rawws.RawClient) -> None:
                await raw.send(frames.BINARY, blob)
                _opcode, payload = await raw.receive()
                if len(payload) != len(blob):
                    raise RuntimeError("short echo")

            async def sample() -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, rss_bytes(gateway.pid))
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                async with trio.open_nursery() as senders:
                    for raw in clients:
                        senders.start_soon(one, raw)
                done.set()
            for raw in clients:
                await raw.stream.aclose()
            await trio.sleep(2)  # the relays close and free their buffers
            after = rss_bytes(gateway.pid)
        note = f"{clients_n} clients x one 1 MiB frame at once; CXG_WS_INFLIGHT_BUDGET=256MiB"
        results.add(SECTION, "daemon RSS at start (burst)", "MiB", [start / MIB], note)
        results.add(SECTION, "daemon peak RSS growth, 1 MiB burst", "MiB", [(peak - start) / MIB])
        results.add(
            SECTION, "daemon RSS after the burst - at start", "MiB", [(after - start) / MIB]
        )
        print(
            f"    burst: start {start / MIB:.0f} MiB, peak +{(peak - start) / MIB:.0f} MiB, "
            f"after +{(after - start) / MIB:.0f} MiB",
            flush=True,
        )
        # One client, 60 MiB frames, a child that reads nothing.
        pid = int(gateway.child(workspace)["pid"])
        head, raw = await rawws.raw_connect(host, port, token)
        start = rss_bytes(gateway.pid)
        peak = start
        os.kill(pid, signal.SIGSTOP)
        try:
            big = bytes(60 * MIB)
            with trio.move_on_after(10):
                for _ in range(3):
                    await raw.send(frames.BINARY, big)
            for _ in range(20):
                peak = max(peak, rss_bytes(gateway.pid))
                await trio.sleep(0.05)
        finally:
            os.kill(pid, signal.SIGCONT)
        await raw.stream.aclose()
        results.add(
            SECTION,
            "daemon peak RSS growth, 60 MiB frames to a stopped child",
            "MiB",
            [(peak - start) / MIB],
            "one client; the child is SIGSTOPped and reads nothing",
        )
        print(f"    stalled child: peak +{(peak - start) / MIB:.0f} MiB", flush=True)
