"""env-mcp start: process spawn → ``tools/list`` answered, as codex sees it before a first turn.

codex spawns one ``codex-app-gateway env-mcp`` per executor and includes the executor in a
thread's first model request only once it has answered ``tools/list``; this is that delay. The
baseline is the smallest stdio server the same ``mcp`` package allows (``mcp.server.lowlevel``
with one tool), started the same way by the same interpreter: the ratio is what env-mcp adds.
Interleaved, a fresh process each sample. ``python -m gateway_tests.bench.envmcp`` runs it alone.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import trio

from gateway_tests.bench.common import REPO, Options, Results, ratio_values

SECTION = "envmcp"
TOKEN_ENV = "CXG_BRIDGE_TOKEN_BENCH"
CHANNEL_ENV = "CXG_ENVMCP_CHANNEL"
# Only spawned and asked for its tools: it never dials the bridge nor asks the session.
ENV_MCP = (
    sys.executable,
    "-m",
    "gateway",
    "env-mcp",
    "--channel-env",
    CHANNEL_ENV,
)
ENV_MCP_PER_EXECUTOR = (
    sys.executable,
    "-m",
    "gateway",
    "env-mcp",
    "--exe-id",
    "exe_bench",
    "--bridge-url",
    "ws://127.0.0.1:9/bridge/exe_bench",
    "--token-env",
    TOKEN_ENV,
)
MINIMAL_SERVER = """
import anyio
import mcp_types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

async def list_tools(ctx, params):
    return types.ListToolsResult(tools=[types.Tool(name="t", input_schema={"type": "object"})])

async def main():
    server = Server("minimal", on_list_tools=list_tools)
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())

anyio.run(main)
"""
MINIMAL = (sys.executable, "-c", MINIMAL_SERVER)
PATHS = {
    "env-mcp": ENV_MCP,
    "env-mcp per-executor": ENV_MCP_PER_EXECUTOR,
    "minimal mcp server": MINIMAL,
}
_HANDSHAKE = [
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "0"},
        },
    },
    {"jsonrpc": "2.0", "method": "notifications/initialized"},
    {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
]
TIMEOUT_SECONDS = 30.0


async def spawn_to_tools_list(argv: Sequence[str]) -> float:
    """Seconds from spawning ``argv`` to its ``tools/list`` answer (codex's sequence).

    The three messages are written at once, as a client that does not wait would; the server
    reads them as it gets to them.
    """
    env = {
        **os.environ,
        TOKEN_ENV: "bench-token",
        CHANNEL_ENV: "/nonexistent/executors.sock",
        "PYTHONPATH": str(REPO),
    }
    payload = "".join(json.dumps(message) + "\n" for message in _HANDSHAKE).encode()
    started = time.perf_counter()
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=str(REPO),
    )
    try:
        assert process.stdin is not None and process.stdout is not None
        with trio.fail_after(TIMEOUT_SECONDS):
            await process.stdin.send_all(payload)
            buffer = b""
            while True:
                chunk = await process.stdout.receive_some(65536)
                if not chunk:
                    raise RuntimeError(f"{argv[0]} exited before answering tools/list")
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip() and json.loads(line).get("id") == 2:
                        elapsed = time.perf_counter() - started
                        if "result" not in json.loads(line):
                            raise RuntimeError(f"tools/list failed: {line[:200]!r}")
                        return elapsed
    finally:
        with trio.CancelScope(shield=True):
            if process.stdin is not None:
                await process.stdin.aclose()
            with trio.move_on_after(5):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


async def run(opts: Options, results: Results) -> None:
    count = 3 if opts.quick else 7
    per_path: dict[str, list[float]] = {path: [] for path in PATHS}
    for rep in range(opts.reps):
        for path, argv in PATHS.items():
            samples = [await spawn_to_tools_list(argv) for _ in range(count)]
            per_path[path].append(statistics.median(samples))
            print(
                f"    rep {rep + 1} {path:20s} spawn → tools/list p50 "
                f"{per_path[path][-1] * 1e3:7.1f} ms",
                flush=True,
            )
    note = f"{count} spawns per repetition, p50"
    for path in PATHS:
        values = [v * 1e3 for v in per_path[path]]
        results.add(SECTION, f"spawn → tools/list p50, {path}", "ms", values, note)
    results.add(
        SECTION,
        "spawn → tools/list env-mcp / minimal mcp server",
        "ratio",
        ratio_values(per_path["env-mcp"], per_path["minimal mcp server"]),
    )


async def _main() -> None:
    from pathlib import Path

    results = Results()
    await run(Options(quick=False, work_dir=Path("."), reps=3), results)
    for figure in results.figures:
        print(f"{figure.name}: {figure.median:.2f} {figure.unit}")


if __name__ == "__main__":
    trio.run(_main)
