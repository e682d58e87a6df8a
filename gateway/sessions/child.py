"""The ``codex app-server`` child of one session: spawn, readiness, log relay, stop.

``run_codex_child`` is one function you ``nursery.start()``: it reports the ready child with
``task_status.started(child)``, relays the child's stdout/stderr lines into the structured log,
returns the exit status when the child exits on its own, and stops it when cancelled. Stopping
ends the child's whole process tree (``process_tree.stop_process_tree``: SIGTERM, the grace,
SIGKILL, escaped processes included). The child is started by ``child_process`` so that it dies
with the daemon.

The output relays are not cut off when the child exits or the session stops: the last lines a
dying child writes (a panic message) are the ones worth having. They run shielded until EOF,
bounded after the child is gone by ``DRAIN_SECONDS`` and ``DRAIN_BYTES`` per stream (a
grandchild that inherited the pipe may keep it open).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs
import httpx2
import structlog
import trio

from gateway.sessions.child_process import ChildProcess, start_child_process
from gateway.sessions.isolation import ChildIdentity
from gateway.sessions.process_tree import stop_process_tree

log = structlog.get_logger(__name__)

_LISTENING = re.compile(r"listening on:\s*(ws://\S+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# The banner comes within a few lines; a child that prints a flood first is not a codex.
_MAX_LINE = 64 * 1024
_READYZ_POLL_SECONDS = 0.02
# How much of the child's output is still relayed once it is gone (see the module docstring).
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1 << 20


class ChildStartError(Exception):
    """The child did not start or did not become ready; the message says what happened."""


@attrs.define
class CodexChild:
    """A running, ready ``codex app-server`` child."""

    process: ChildProcess
    ws_url: str
    capability_token: str = attrs.field(repr=False)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def authorization_header(self) -> tuple[str, str]:
        """The header that opens a connection to this child (and nothing else can)."""
        return ("authorization", f"Bearer {self.capability_token}")


@attrs.frozen
class ChildSpec:
    """How to start one session's child."""

    codex_bin: str
    codex_home: Path
    env: Mapping[str, str] = attrs.field(repr=False)
    cwd: Path
    ready_timeout: float
    stop_grace: float
    #: The uid/gid to run under (gateway/sessions/isolation.py); None: the gateway's own.
    identity: ChildIdentity | None = None
    #: Asked when the child is stopped: True skips the SIGTERM grace (a fenced session's child
    #: is killed at once, wherever in its start it is).
    kill_at_once: Callable[[], bool] | None = attrs.field(default=None, eq=False)


def app_server_argv(codex_bin: str, token_sha256: str) -> list[str]:
    """The child's command line: loopback TCP, an ephemeral port, capability-token auth.

    Only the token's hash is in argv (readable by anyone in the pod); the token itself stays in
    this process. The unix-socket transport is not used: codex 0.169.0 does not enforce the token
    there and places the socket in a shared directory.
    """
    return [
        codex_bin,
        "app-server",
        "--listen",
        "ws://127.0.0.1:0",
        "--ws-auth",
        "capability-token",
        "--ws-token-sha256",
        token_sha256,
    ]


def _clean(line: bytes) -> str:
    return _ANSI.sub("", line.decode("utf-8", "replace")).rstrip()


class _LineReader:
    """Splits a byte stream into lines, bounding the length of any one line."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next_line(self) -> bytes | None:
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                return line
            if len(self._buffer) > _MAX_LINE:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                if self._buffer:
                    line = bytes(self._buffer)
                    self._buffer.clear()
                    return line
                return None
            self._buffer += chunk


class _Drain:
    """Keeps the output relays running past the child's end, within bounds."""

    def __init__(self) -> None:
        self.child_gone = False
        self._scopes: list[trio.CancelScope] = []

    def scope(self) -> trio.CancelScope:
        """A shielded scope for one relay: the session's cancellation does not cut it off."""
        scope = trio.CancelScope(shield=True)
        if self.child_gone:
            scope.deadline = trio.current_time() + DRAIN_SECONDS
        self._scopes.append(scope)
        return scope

    def finish(self) -> None:
        """The child's tree is gone: what is left in the pipes is read for a bounded time."""
        self.child_gone = True
        for scope in self._scopes:
            scope.deadline = min(scope.deadline, trio.current_time() + DRAIN_SECONDS)


async def _relay_lines(reader: _LineReader, stream_name: str, pid: int, drain: _Drain) -> None:
    after_exit = 0
    with drain.scope() as scope:
        while (line := await reader.next_line()) is not None:
            if drain.child_gone:
                after_exit += len(line) + 1
                if after_exit > DRAIN_BYTES:
                    log.warning("child.output_truncated", stream=stream_name, pid=pid)
                    return
            text = _clean(line)
            if text:
                log.info("child.output", stream=stream_name, pid=pid, line=text)
    if scope.cancelled_caught:
        log.warning("child.output_not_closed", stream=stream_name, pid=pid)


async def _wait_ready(http_url: str, deadline: float, process: ChildProcess) -> None:
    async with httpx2.AsyncClient(timeout=2.0) as http:
        last_error = "no answer"
        while trio.current_time() < deadline:
            if process.exited:
                raise ChildStartError("codex app-server exited before it became ready")
            try:
                response = await http.get(f"{http_url}/readyz")
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}"
            except httpx2.HTTPError as exc:
                last_error = type(exc).__name__
            await trio.sleep(_READYZ_POLL_SECONDS)
        raise ChildStartError(f"codex app-server never became ready (/readyz: {last_error})")


async def run_codex_child(
    spec: ChildSpec, *, task_status: trio.TaskStatus[CodexChild] = trio.TASK_STATUS_IGNORED
) -> int:
    """Run one ``codex app-server``; see the module docstring for the lifecycle."""
    token = secrets.token_urlsafe(32)
    argv = app_server_argv(spec.codex_bin, hashlib.sha256(token.encode()).hexdigest())
    try:
        process = start_child_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(spec.env),
            cwd=str(spec.cwd),
            start_new_session=True,
            **(spec.identity.spawn_options() if spec.identity is not None else {}),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ChildStartError(f"cannot run {spec.codex_bin!r}: {detail}") from None
    assert process.stdout is not None and process.stderr is not None
    stderr = _LineReader(process.stderr)
    stdout = _LineReader(process.stdout)
    drain = _Drain()
    try:
        return await _supervise(spec, process, token, stdout, stderr, drain, task_status)
    except BaseExceptionGroup as group:
        # The relays' nursery wraps a start failure; callers see the one ChildStartError.
        start_errors, _ = group.split(ChildStartError)
        if start_errors is not None:
            raise _first_leaf(start_errors) from None
        raise


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _supervise(
    spec: ChildSpec,
    process: ChildProcess,
    token: str,
    stdout: _LineReader,
    stderr: _LineReader,
    drain: _Drain,
    task_status: trio.TaskStatus[CodexChild],
) -> int:
    """Wait for readiness, relay output, report started, then wait for the exit; stop the tree."""
    async with trio.open_nursery() as relays:
        try:
            with trio.move_on_after(spec.ready_timeout) as banner_scope:
                ws_url = await _read_banner(stderr, process.pid)
            if banner_scope.cancelled_caught:
                raise ChildStartError(
                    "codex app-server printed no 'listening on' banner within "
                    f"{spec.ready_timeout:g}s"
                )
            http_url = "http://" + ws_url.removeprefix("ws://").split("/", 1)[0]
            deadline = trio.current_time() + spec.ready_timeout
            relays.start_soon(_relay_lines, stdout, "stdout", process.pid, drain)
            relays.start_soon(_relay_lines, stderr, "stderr", process.pid, drain)
            await _wait_ready(http_url, deadline, process)
            child = CodexChild(process=process, ws_url=ws_url, capability_token=token)
            log.info("child.ready", pid=process.pid, url=ws_url)
            task_status.started(child)
            await process.wait_exited()
        finally:
            # The session's directory holds CODEX_HOME and the child's HOME (SessionDirectories).
            at_once = spec.kill_at_once is not None and spec.kill_at_once()
            grace = 0.0 if at_once else spec.stop_grace
            status = await stop_process_tree(process, grace, spec.codex_home.parent)
            drain.finish()
    return status


async def _read_banner(reader: _LineReader, pid: int) -> str:
    while True:
        line = await reader.next_line()
        if line is None:
            raise ChildStartError("codex app-server exited before printing its listening address")
        text = _clean(line)
        if text:
            log.info("child.output", stream="stderr", pid=pid, line=text)
        match = _LISTENING.search(text)
        if match:
            return match.group(1)


def build_child_env(
    inherited: Mapping[str, str],
    *,
    codex_home: Path,
    home: Path,
    extra: Mapping[str, str],
    passthrough: Sequence[str] = (
        "PATH",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ),
) -> dict[str, str]:
    """The child's environment: an explicit allow-list, never the gateway's own secrets.

    Only the listed variables pass through; ``CODEX_HOME`` and ``HOME`` point into the
    session's private directory; ``extra`` carries what the session adds on purpose.
    """
    env = {name: inherited[name] for name in passthrough if name in inherited}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["CODEX_HOME"] = str(codex_home)
    env["HOME"] = str(home)
    for name, value in extra.items():
        if name.startswith("CXG_"):
            # The gateway's own configuration never reaches a child, whatever a caller asks.
            raise ValueError(f"refusing to pass {name} to the child")
        env[name] = value
    return env
