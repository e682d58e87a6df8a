"""The forwarded hop's cost: the same child reached directly on its owner, or through a peer.

Two daemons in replica mode (their own processes, one moto S3 server), one workspace owned by
pod A (a fixed placement table, see ``gatewayd``), the real codex as A's child. Two paths to
that one child, interleaved in every repetition:

* ``direct``: A's own WebSocket route (what a client the ingress happened to send to A gets);
* ``forwarded``: B's WebSocket route; B verifies the token, signs a grant and relays to A's
  internal listener (the connect any other pod receives).

Figures: the small-request round trip (p50, p99) on one connection and what the hop adds to
it; the CPU per small request under 20 (quick) or 100 concurrent connections, of A alone for
``direct`` and of A + B for ``forwarded`` (B's share is the hop's own cost); and the attach
time (connect, upgrade, initialize).
"""

from __future__ import annotations

import json
import statistics
import time

import trio

from gateway_tests.bench import client
from gateway_tests.bench.common import (
    Options,
    Results,
    cpu_seconds,
    difference_values,
    free_port,
    percentile,
    ratio_values,
)
from gateway_tests.bench.procs import Gateway, real_codex_bin, running_gateway, running_moto
from gateway_tests.s3_server import BUCKET, REGION

SECTION = "hop"
PATHS = ("direct", "forwarded")
WORKSPACE = "bench-hop"
PEER_SECRET = "bench-peer-secret"


def _pod_env(name: str, peer_addr: str, endpoint: str, owner_addr: str) -> dict[str, str]:
    return {
        "CXG_S3_BUCKET": BUCKET,
        "CXG_S3_ENDPOINT": endpoint,
        "CXG_S3_REGION": REGION,
        "CXG_S3_PATH_STYLE": "true",
        "CXG_S3_ACCESS_KEY_ID": "test",
        "CXG_S3_SECRET_ACCESS_KEY": "test",
        "CXG_POD_NAME": name,
        "CXG_PEER_ADDR": peer_addr,
        "CXG_PEER_LISTEN_ADDR": peer_addr,
        "CXG_PEER_SECRET": PEER_SECRET,
        "CXG_MAX_CLIENTS_PER_WORKSPACE": "0",
        "CXG_BENCH_PLACEMENT": json.dumps(
            {"pod": name, "owners": {WORKSPACE: ["gw-a", owner_addr, 1]}}
        ),
    }


def _create_bucket(endpoint: str) -> None:
    import boto3

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    ).create_bucket(Bucket=BUCKET)


def _us(values: list[float]) -> list[float]:
    return [v * 1e6 for v in values]


async def _latency(urls: dict[str, str], opts: Options, results: Results) -> None:
    count = 300 if opts.quick else 2000
    warmup = 50 if opts.quick else 200
    headers = Gateway.headers(WORKSPACE)
    per_path: dict[str, dict[str, list[float]]] = {p: {"p50": [], "p99": []} for p in PATHS}
    for rep in range(opts.reps):
        for path in PATHS:
            async with client.connect(urls[path], headers) as ws:
                await client.initialize(ws)
                await client.small_round_trips(ws, warmup, first_id=1)
                samples = await client.small_round_trips(ws, count, first_id=warmup + 1)
            p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
            per_path[path]["p50"].append(p50)
            per_path[path]["p99"].append(p99)
            print(
                f"    rep {rep + 1} {path:9s} round trip p50 {p50 * 1e6:7.0f} µs"
                f"  p99 {p99 * 1e6:7.0f} µs",
                flush=True,
            )
    note = f"{count} sequential thread/read round trips per repetition on one connection"
    for path in PATHS:
        for q in ("p50", "p99"):
            results.add(SECTION, f"round trip {q}, {path}", "µs", _us(per_path[path][q]), note)
    for q in ("p50", "p99"):
        added = difference_values(per_path["forwarded"][q], per_path["direct"][q])
        results.add(SECTION, f"added round trip {q}, hop", "µs", _us(added), "forwarded - direct")


async def _attach(urls: dict[str, str], opts: Options, results: Results) -> None:
    count = 10 if opts.quick else 60
    headers = Gateway.headers(WORKSPACE)
    per_path: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(opts.reps):
        samples = await client.interleaved_attaches({p: (urls[p], headers) for p in PATHS}, count)
        for path in PATHS:
            per_path[path].append(statistics.median(samples[path]))
            print(
                f"    rep {rep + 1} {path:9s} connect+upgrade+initialize p50 "
                f"{per_path[path][-1] * 1e3:6.2f} ms",
                flush=True,
            )
    for path in PATHS:
        results.add(
            SECTION,
            f"attach p50, {path}",
            "ms",
            [v * 1e3 for v in per_path[path]],
            f"{count} connects per path per repetition to a live session, paths in turn",
        )
    results.add(
        SECTION,
        "attach added p50, hop",
        "ms",
        [v * 1e3 for v in difference_values(per_path["forwarded"], per_path["direct"])],
        "token check on B, grant, second upgrade",
    )


async def _cpu(urls: dict[str, str], pids: dict[str, int], opts: Options, results: Results) -> None:
    connections = 20 if opts.quick else 100
    requests = 50 if opts.quick else 200
    headers = Gateway.headers(WORKSPACE)
    cpu: dict[str, list[float]] = {"direct": [], "forwarded": [], "forwarder": []}
    rates: dict[str, list[float]] = {p: [] for p in PATHS}
    for rep in range(opts.reps):
        for path in PATHS:
            url = urls[path]
            ready = 0
            all_ready, go = trio.Event(), trio.Event()

            async def one(
                url: str = url, all_ready: trio.Event = all_ready, go: trio.Event = go
            ) -> None:
                nonlocal ready
                async with client.connect(url, headers) as ws:
                    await client.initialize(ws)
                    ready += 1
                    if ready == connections:
                        all_ready.set()
                    await go.wait()
                    await client.small_round_trips(ws, requests)

            with trio.fail_after(300):
                async with trio.open_nursery() as nursery:
                    for _ in range(connections):
                        nursery.start_soon(one)
                    await all_ready.wait()
                    before = {pod: cpu_seconds(pid) for pod, pid in pids.items()}
                    started = time.perf_counter()
                    go.set()
                elapsed = time.perf_counter() - started
            used = {pod: cpu_seconds(pid) - before[pod] for pod, pid in pids.items()}
            total = connections * requests
            rates[path].append(total / elapsed)
            if path == "direct":
                cpu["direct"].append(used["a"] / total * 1e6)
            else:
                cpu["forwarded"].append((used["a"] + used["b"]) / total * 1e6)
                cpu["forwarder"].append(used["b"] / total * 1e6)
            print(
                f"    rep {rep + 1} {path:9s} {connections}x{requests}: "
                f"{rates[path][-1]:7.0f} req/s",
                flush=True,
            )
    note = f"{connections} connections x {requests} requests at once; process CPU / requests"
    results.add(SECTION, "CPU per small request, direct (owner)", "µs", cpu["direct"], note)
    results.add(
        SECTION, "CPU per small request, forwarded (owner + forwarder)", "µs", cpu["forwarded"]
    )
    results.add(SECTION, "CPU per small request, forwarder's share", "µs", cpu["forwarder"])
    for path in PATHS:
        results.add(SECTION, f"{connections} connections req/s, {path}", "req/s", rates[path])
    results.add(
        SECTION,
        f"{connections} connections req/s, forwarded / direct",
        "ratio",
        ratio_values(rates["forwarded"], rates["direct"]),
    )


async def run(opts: Options, results: Results) -> None:
    """Two pods, one owner: direct against forwarded, interleaved."""
    work = opts.work_dir / SECTION
    work.mkdir(parents=True, exist_ok=True)
    # Children run under their own uids when the bench runs as root: the session roots under
    # the scratch directory must be reachable for them, as the chart's emptyDir is.
    for directory in (opts.work_dir, work):
        directory.chmod(0o711)
    codex = real_codex_bin()
    with running_moto(work / "moto.log") as endpoint:
        _create_bucket(endpoint)
        a_addr, b_addr = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        async with (
            running_gateway(work / "a", codex, **_pod_env("gw-a", a_addr, endpoint, a_addr)) as a,
            running_gateway(work / "b", codex, **_pod_env("gw-b", b_addr, endpoint, a_addr)) as b,
        ):
            urls = {"direct": a.ws_url, "forwarded": b.ws_url}
            async with client.connect(a.ws_url, Gateway.headers(WORKSPACE)) as ws:
                await client.initialize(ws)
            if b.children():
                raise RuntimeError("the forwarding pod started a child of its own")
            await _latency(urls, opts, results)
            await _attach(urls, opts, results)
            await _cpu(urls, {"a": a.pid, "b": b.pid}, opts, results)
