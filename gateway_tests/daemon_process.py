"""The daemon as a real process: ``python -m gateway serve`` run as an operator runs it.

A clean process environment (``base_env``/``daemon_env``), one-shot commands (``run_cli``), a
``serve`` process whose JSON log is read as it is written (``serve_process``,
``DaemonProcess``), and a client for it (``client``). Tests that need signals, exit codes or
the daemon's own log use these; the in-process daemon is in ``gateway_tests.harness``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from gateway_tests.conftest import REPO
from gateway_tests.harness import Rpc, connect_url, gateway_env

# How long a daemon may take to start listening (interpreter start-up and imports included).
START_TIMEOUT = 30.0
# Slack on top of CXG_DRAIN_BUDGET for the interpreter to exit after the drain.
EXIT_MARGIN = 3.0
# A one-shot command (help, mint-token, a refused start) ends well within this.
CLI_TIMEOUT = 30.0


def base_env(**extra: str) -> dict[str, str]:
    """A clean process environment: nothing inherited but what a shell needs."""
    env = {name: os.environ[name] for name in ("PATH", "LANG", "TZ") if name in os.environ}
    env["HOME"] = os.environ.get("HOME", "/")
    env.update(extra)
    return env


def gateway_command(*args: str, prefix: Sequence[str] = ()) -> list[str]:
    """``python -m gateway ARGS…`` with this interpreter (the repository's virtualenv).

    ``prefix`` runs it through a wrapper (``setpriv …``, to bound its capabilities).
    """
    return [*prefix, sys.executable, "-m", "gateway", *args]


async def run_cli(
    args: Sequence[str], env: Mapping[str, str], *, prefix: Sequence[str] = ()
) -> subprocess.CompletedProcess[bytes]:
    """Run a one-shot command (``mint-token``, ``--help``, a failing ``serve``) to its end."""
    with trio.fail_after(CLI_TIMEOUT):
        return await trio.run_process(
            gateway_command(*args, prefix=prefix),
            env=dict(env),
            cwd=REPO,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


class DaemonProcess:
    """A ``serve`` process whose stderr (JSON log lines) is read continuously.

    The pipe is always drained (a daemon blocked on a full pipe would hang the test), every line
    is kept, and waiters are woken on each new line or when the process exits.
    """

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []
        self.exited = trio.Event()
        self._changed = trio.Event()

    @property
    def output(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return "\n".join(self.lines)

    async def pump(self) -> None:
        """Read stderr to EOF, then reap the process."""
        assert self.process.stderr is not None
        buffer = b""
        while chunk := await self.process.stderr.receive_some(65536):
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                self._add(raw)
        if buffer:
            self._add(buffer)
        await self.process.wait()
        self.exited.set()
        self._wake()

    def _add(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace")
        self.lines.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            self.records.append(record)
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_log(self, event: str, **fields: Any) -> dict[str, Any]:
        """The first log record named ``event`` whose fields include ``fields``."""
        while True:
            for record in self.records:
                if record.get("event") == event and all(
                    record.get(key) == value for key, value in fields.items()
                ):
                    return record
            if self.exited.is_set():
                raise AssertionError(f"daemon exited before logging {event}:\n{self.output}")
            await self._changed.wait()

    async def wait_exit(self) -> int:
        """The exit status, once the process has exited and its output is read."""
        await self.exited.wait()
        assert self.process.returncode is not None
        return self.process.returncode


@asynccontextmanager
async def serve_process(
    env: Mapping[str, str], *args: str, prefix: Sequence[str] = ()
) -> AsyncIterator[tuple[DaemonProcess, str]]:
    """Run ``python -m gateway serve ARGS…`` and yield it with its base HTTP URL.

    The URL comes from the ``daemon.serving`` log line (the daemon listens on port 0). On the
    way out a still-running daemon is killed, so a failing test never leaves one behind.
    """
    process = await trio.lowlevel.open_process(
        gateway_command("serve", *args, prefix=prefix),
        env=dict(env),
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    daemon = DaemonProcess(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon.pump)
            with trio.fail_after(START_TIMEOUT):
                serving = await daemon.wait_for_log("daemon.serving")
            yield daemon, serving["urls"][0]
            if process.returncode is None:
                process.kill()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def daemon_env(tmp_path: Path, codex_bin: Path, **overrides: str) -> dict[str, str]:
    """The harness's daemon environment, logging JSON, on top of a clean process environment."""
    return base_env(**gateway_env(tmp_path, codex_bin, CXG_LOG_FORMAT="json", **overrides))


def ws_url(http_url: str) -> str:
    """The WebSocket URL of a daemon serving at ``http_url``."""
    return "ws://" + http_url.removeprefix("http://") + "/"


def client(http_url: str, token: str) -> AbstractAsyncContextManager[Rpc]:
    """An initialized JSON-RPC client connected through the daemon with ``token``."""
    return connect_url(ws_url(http_url), token)


def one_line(stream: bytes) -> str:
    """The single line a usage or configuration error must consist of."""
    lines = stream.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]
