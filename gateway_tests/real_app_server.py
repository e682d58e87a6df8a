"""The pinned real ``codex app-server`` started directly (no gateway), for tests of pieces the
gateway hands to it: the rendered config.toml, the model token command, executor MCP servers.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import attrs
import trio

_BANNER = re.compile(rb"listening on:\s*(ws://[0-9.]+:\d+)")


@attrs.define
class AppServer:
    """A running real ``codex app-server`` and everything it printed on stderr."""

    process: trio.Process
    url: str
    stderr: bytearray

    @property
    def pid(self) -> int:
        return self.process.pid


async def run_app_server(
    codex_bin: Path,
    codex_home: Path,
    extra_env: dict[str, str],
    *,
    task_status: trio.TaskStatus[AppServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Spawn the app-server with a session-like allow-listed environment; stop it on cancel."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(codex_home),
        "CODEX_HOME": str(codex_home),
        "LANG": "C.UTF-8",
        **extra_env,
    }
    process = await trio.lowlevel.open_process(
        [str(codex_bin), "app-server", "--listen", "ws://127.0.0.1:0"],
        env=env,
        cwd=str(codex_home),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    stderr = bytearray()
    try:
        with trio.fail_after(30):
            while (match := _BANNER.search(stderr)) is None:
                chunk = await process.stderr.receive_some()
                if not chunk:
                    raise RuntimeError(f"codex exited before listening: {bytes(stderr)!r}")
                stderr += chunk
        task_status.started(AppServer(process, match.group(1).decode(), stderr))
        async for chunk in process.stderr:
            stderr += chunk
    finally:
        with trio.CancelScope(shield=True):
            process.terminate()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
