"""Spawn storm: N simultaneous first connects to N workspaces, until every one is attached.

Through a fresh gateway (each connect authenticates, restores, spawns its child, waits for it
and relays ``initialize``) against the same N children started directly at once and connected
to as soon as each banner appears. Fake codex and real codex; interleaved per repetition.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from gateway_tests.bench import client
from gateway_tests.bench.common import Options, Results, ratio_values
from gateway_tests.bench.procs import (
    direct_child,
    fake_codex_bin,
    prepare_home,
    real_codex_bin,
    running_gateway,
)

SECTION = "storm"
STORM_TIMEOUT = 600


async def _gateway_storm(work: Path, codex_bin: Path, count: int) -> tuple[float, str]:
    async with running_gateway(work, codex_bin, CXG_MAX_SESSIONS=str(count * 2)) as gateway:
        async with client.connect(gateway.ws_url, gateway.headers("storm-warm")) as ws:
            await client.initialize(ws)
        config_toml = (
            gateway.run_dir / "sessions" / "storm-warm" / "codex-home" / "config.toml"
        ).read_text()
        done = trio.Event()
        attached = 0

        async def one(name: str) -> None:
            nonlocal attached
            async with client.connect(gateway.ws_url, gateway.headers(name)) as ws:
                await client.initialize(ws)
                attached += 1
                if attached == count:
                    done.set()
                await done.wait()

        with trio.fail_after(STORM_TIMEOUT):
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    nursery.start_soon(one, f"storm-{i}")
                await done.wait()
                elapsed = time.perf_counter() - started
        children = len(gateway.children()) - 1
        if children != count:
            raise RuntimeError(f"{children} children started for {count} workspaces")
    return elapsed, config_toml


async def _direct_storm(work: Path, codex_bin: Path, count: int, config_toml: str) -> float:
    done = trio.Event()
    attached = 0

    async def one(index: int) -> None:
        nonlocal attached
        _, home, env = prepare_home(work / f"child-{index}", config_toml)
        async with (
            direct_child(codex_bin, env, home) as child,
            client.connect(child.url, child.headers()) as ws,
        ):
            await client.initialize(ws)
            attached += 1
            if attached == count:
                done.set()
            await done.wait()

    with trio.fail_after(STORM_TIMEOUT):
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
            await done.wait()
            elapsed = time.perf_counter() - started
    return elapsed


async def run(opts: Options, results: Results) -> None:
    work = opts.work_dir / SECTION
    count = 20 if opts.quick else 100
    binaries = {"fake codex": fake_codex_bin(work / "bin"), "real codex": real_codex_bin()}
    for kind, codex_bin in binaries.items():
        slug = kind.split()[0]
        per_path: dict[str, list[float]] = {"direct": [], "gateway": []}
        config_toml = ""
        for rep in range(opts.reps):
            for path in ("gateway", "direct"):
                if path == "gateway":
                    seconds, config_toml = await _gateway_storm(
                        work / f"gateway-{slug}-{rep}", codex_bin, count
                    )
                else:
                    seconds = await _direct_storm(
                        work / f"direct-{slug}-{rep}", codex_bin, count, config_toml
                    )
                per_path[path].append(seconds)
                print(
                    f"    rep {rep + 1} {kind} {path:8s} {count} first connects: all attached "
                    f"in {seconds:6.2f} s",
                    flush=True,
                )
        note = f"{count} workspaces connecting at once; until every initialize is answered"
        for path in ("direct", "gateway"):
            results.add(SECTION, f"{count} at once, {kind}, {path}", "s", per_path[path], note)
        results.add(
            SECTION,
            f"{count} at once, {kind}, gateway / direct",
            "ratio",
            ratio_values(per_path["gateway"], per_path["direct"]),
        )
