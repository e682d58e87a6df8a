"""Session cold start: WebSocket upgrade → ``initialize`` answered, for a workspace never seen.

Through the gateway (authenticate, restore — nothing stored yet —, render config.toml, spawn,
banner, ``/readyz``, connect to the child, relay ``initialize``) against starting the same child
directly (a fresh CODEX_HOME with the config.toml the gateway renders, the same allow-listed
environment, the same command line) and connecting as soon as its banner names the port.
Real codex and fake codex; interleaved, new workspace each time.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import httpx2

from gateway_tests.bench import client
from gateway_tests.bench.common import Options, Results, difference_values, ratio_values
from gateway_tests.bench.procs import (
    Gateway,
    direct_child,
    fake_codex_bin,
    prepare_home,
    real_codex_bin,
    running_gateway,
)
from gateway_tests.harness import ADMIN_SECRET

SECTION = "coldstart"
WARM_WORKSPACE = "bench-cold-warm"


async def _gateway_cold(gateway: Gateway, workspace: str) -> float:
    seconds = await client.connect_and_initialize(gateway.ws_url, gateway.headers(workspace))
    # Stop (and save) the session outside the measurement so sessions do not pile up.
    async with httpx2.AsyncClient(timeout=60) as http:
        await http.post(
            f"{gateway.http_url}/admin/sessions/restart",
            json={"workspaceId": workspace},
            headers={"Authorization": f"Bearer {ADMIN_SECRET}"},
        )
    return seconds


async def _direct_cold(codex_bin: Path, root: Path, config_toml: str) -> float:
    _, home, env = prepare_home(root, config_toml)
    started = time.perf_counter()
    async with direct_child(codex_bin, env, home) as child:
        await client.connect_and_initialize(child.url, child.headers())
        return time.perf_counter() - started


async def run(opts: Options, results: Results) -> None:
    work = opts.work_dir / SECTION
    count = 2 if opts.quick else 5
    binaries = {
        "real codex": real_codex_bin(),
        "fake codex": fake_codex_bin(work / "bin"),
    }
    for kind, codex_bin in binaries.items():
        print(f"  cold start, {kind}", flush=True)
        slug = kind.split()[0]
        async with running_gateway(work / f"gateway-{slug}", codex_bin) as gateway:
            async with client.connect(gateway.ws_url, gateway.headers(WARM_WORKSPACE)) as ws:
                await client.initialize(ws)
            config_toml = (
                gateway.run_dir / "sessions" / WARM_WORKSPACE / "codex-home" / "config.toml"
            ).read_text()
            per_path: dict[str, list[float]] = {"direct": [], "gateway": []}
            for rep in range(opts.reps):
                for path in ("direct", "gateway"):
                    samples = []
                    for i in range(count):
                        if path == "gateway":
                            samples.append(await _gateway_cold(gateway, f"cold-{rep}-{i}"))
                        else:
                            root = work / f"direct-{slug}-{rep}-{i}"
                            samples.append(await _direct_cold(codex_bin, root, config_toml))
                    per_path[path].append(statistics.median(samples))
                    print(
                        f"    rep {rep + 1} {path:8s} cold start p50 "
                        f"{per_path[path][-1] * 1e3:7.1f} ms",
                        flush=True,
                    )
        note = f"{count} cold starts per repetition, p50; new workspace each time"
        for path in ("direct", "gateway"):
            results.add(
                SECTION,
                f"cold start p50, {kind}, {path}",
                "ms",
                [v * 1e3 for v in per_path[path]],
                note,
            )
        results.add(
            SECTION,
            f"cold start added p50, {kind}",
            "ms",
            [v * 1e3 for v in difference_values(per_path["gateway"], per_path["direct"])],
            "<= 50 ms is the target",
        )
        results.add(
            SECTION,
            f"cold start gateway / direct, {kind}",
            "ratio",
            ratio_values(per_path["gateway"], per_path["direct"]),
        )
