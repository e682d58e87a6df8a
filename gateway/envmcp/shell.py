"""Running one command on the executor with exec-server 0.169.0's ``process/*`` methods.

Protocol, as the pinned ``codex exec-server`` answers it:

* ``process/start`` ``{processId, argv, cwd, env, tty, pipeStdin, envPolicy}`` → ``{processId,
  sandboxType}``. ``cwd`` is a ``file://`` URI; ``env`` is the whole environment unless
  ``envPolicy`` (``{inherit: core|all|none, ignoreDefaultExcludes, exclude, set, includeOnly}``)
  says what to inherit from the executor; without ``pipeStdin`` stdin reads as empty.
* ``process/read`` ``{processId, afterSeq, maxBytes, waitMs}`` → ``{chunks: [{seq, stream,
  chunk (base64)}], nextSeq, exited, exitCode, closed, failure, sandboxDenied}``. It waits up to
  ``waitMs`` for news. ``afterSeq`` is exclusive: chunks with ``seq > afterSeq`` come back, so the
  next read asks for ``afterSeq = nextSeq - 1`` (asking for ``nextSeq`` would skip a chunk).
* ``process/terminate`` ``{processId}`` → ``{running}``: kills the process group (exit 137).
"""

from __future__ import annotations

import base64
import binascii
import logging
import posixpath
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import attrs
import trio

from gateway.envmcp.bridge import (
    BridgeError,
    EnvironmentInfo,
    ExecServerClient,
    ExecServerError,
    single_errors,
)
from gateway.envmcp.registry import ToolCall
from gateway.envmcp.specs import parse_shell_arguments

log = logging.getLogger(__name__)

# The executor's own basics (HOME, PATH, LANG, SHELL, USER…) but none of its secrets.
CORE_ENV_POLICY = {
    "inherit": "core",
    "ignoreDefaultExcludes": False,
    "exclude": [],
    "set": {},
    "includeOnly": [],
}
READ_MAX_BYTES = 64 * 1024
READ_WAIT_MS = 1000
# The exit can be reported before the last output is: the answer waits for ``closed`` (both
# pipes at EOF), but at most this long after the exit, so that a background process that keeps
# the pipes open does not hold the answer until the time limit.
EXIT_GRACE = 1.0
TERMINATE_TIMEOUT = 5.0
DEFAULT_OUTPUT_LIMIT = 256 * 1024
DEFAULT_CWD_URI = "file:///tmp"

OnOutput = Callable[[str, int], Awaitable[None]]


@attrs.frozen
class ShellOutcome:
    """What the tool reports: the text the model reads, and whether the command failed."""

    text: str
    is_error: bool


@attrs.define
class _Stream:
    limit: int
    data: bytearray = attrs.field(factory=bytearray)
    dropped: int = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += chunk[: max(room, 0)]
        self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        # Joined before decoding so a character split across chunks survives.
        text = self.data.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[output truncated: {self.dropped} more bytes]"
        return text


def _path_uri(path: str) -> str:
    return "file://" + quote(path)


def resolve_cwd(cwd: str | None, info: EnvironmentInfo) -> str:
    """The ``file://`` URI for ``cwd``: absolute, ``~``-relative or relative to the executor's cwd.

    No ``cwd`` means the executor's own working directory (``/tmp`` if it did not say).
    """
    base_uri = info.cwd_uri or DEFAULT_CWD_URI
    if not cwd:
        return base_uri
    if cwd.startswith("file://"):
        return cwd
    if cwd == "~" or cwd.startswith("~/"):
        if info.home_uri:
            home = unquote(urlsplit(info.home_uri).path)
            return _path_uri(posixpath.normpath(home + cwd[1:]))
        raise ValueError("the executor did not say where its home directory is; give a path")
    if cwd.startswith("/"):
        return _path_uri(posixpath.normpath(cwd))
    base = unquote(urlsplit(base_uri).path) or "/"
    return _path_uri(posixpath.normpath(posixpath.join(base, cwd)))


def format_outcome(
    stdout: str,
    stderr: str,
    *,
    exit_code: int | None,
    failure: str | None,
    timed_out_after: float | None,
    cancelled: bool = False,
) -> ShellOutcome:
    """The upstream result text: stdout, a stderr section, failure and exit-code markers."""
    parts = [stdout]
    if stderr:
        if stdout and not stdout.endswith("\n"):
            parts.append("\n")
        parts.append(("--- stderr ---\n" if stdout else "") + stderr)
    text = "".join(parts)
    if text and not text.endswith("\n"):
        text += "\n"
    if failure:
        text += f"[exec failure: {failure}]\n"
    if cancelled:
        text += "[cancelled; the process was killed]"
    elif timed_out_after is not None:
        text += f"[time limit of {timed_out_after:g}s reached; the process was killed]"
    elif exit_code is not None:
        text += f"[exit_code={exit_code}]"
    else:
        text += "[exec ended without an exit code]"
    is_error = bool(failure) or cancelled or timed_out_after is not None or exit_code != 0
    return ShellOutcome(text=text, is_error=is_error)


def _decode_chunk(chunk: Any) -> bytes:
    if not isinstance(chunk, str):
        raise BridgeError("exec-server sent an output chunk that is not base64 text")
    try:
        return base64.b64decode(chunk, validate=True)
    except (binascii.Error, ValueError):
        raise BridgeError("exec-server sent an output chunk that is not valid base64") from None


async def _terminate(client: ExecServerClient, process_id: str) -> None:
    """Kill the remote process; must finish even while the caller is being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(TERMINATE_TIMEOUT) as scope:
        try:
            await client.call("process/terminate", {"processId": process_id})
        except BridgeError as exc:
            log.warning("could not terminate remote process %s: %s", process_id, exc)
    if scope.cancelled_caught:
        log.warning("exec-server did not confirm terminating %s in time", process_id)


@attrs.define
class _Progress:
    """What has been read of one remote process so far."""

    streams: dict[str, _Stream]
    after_seq: int = 0
    total: int = 0
    exit_code: int | None = None
    failure: str | None = None
    exited_at: float | None = None
    finished: bool = False

    def wait_ms(self) -> int:
        """How long the next read may wait for news."""
        if self.exited_at is None:
            return READ_WAIT_MS
        left = self.exited_at + EXIT_GRACE - trio.current_time()
        return max(0, min(READ_WAIT_MS, int(left * 1000)))


async def _read_until_done(
    client: ExecServerClient, process_id: str, progress: _Progress, on_output: OnOutput | None
) -> None:
    """Long-poll ``process/read`` until the process has exited and its output is drained."""
    while not progress.finished:
        result = await client.call(
            "process/read",
            {
                "processId": process_id,
                "afterSeq": progress.after_seq,
                "maxBytes": READ_MAX_BYTES,
                "waitMs": progress.wait_ms(),
            },
        )
        if not isinstance(result, dict):
            raise BridgeError("exec-server sent a process/read result that is not an object")
        chunks = result.get("chunks") or []
        for chunk in chunks:
            data = _decode_chunk(chunk.get("chunk") if isinstance(chunk, dict) else None)
            progress.streams.get(chunk.get("stream"), progress.streams["stdout"]).add(data)
            progress.total += len(data)
            if on_output is not None and data:
                await on_output(data.decode("utf-8", errors="replace"), progress.total)
        next_seq = result.get("nextSeq")
        if isinstance(next_seq, int):
            progress.after_seq = max(progress.after_seq, next_seq - 1)
        if isinstance(result.get("failure"), str):
            progress.failure = result["failure"]
        if result.get("exited"):
            code = result.get("exitCode")
            progress.exit_code = code if isinstance(code, int) else None
            if progress.exited_at is None:
                progress.exited_at = trio.current_time()
        grace_over = progress.exited_at is not None and progress.wait_ms() == 0
        # ``closed`` can come while output is still buffered: done once a read brings none.
        progress.finished = not chunks and (bool(result.get("closed")) or grace_over)


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def run_shell(
    client: ExecServerClient,
    *,
    process_id: str,
    argv: Sequence[str],
    cwd_uri: str,
    time_limit: float,
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
    on_output: OnOutput | None = None,
    stop: trio.Event | None = None,
) -> ShellOutcome:
    """Start ``argv`` on the executor, collect its output and exit code within ``time_limit``.

    When the time limit is hit, or ``stop`` is set (the tool call was cancelled), the remote
    process is killed. ``stop`` exists because a cancelled caller cannot kill anything itself:
    the connection it would need lives inside the cancelled scope. ``on_output(text,
    total_bytes)`` is awaited for each piece of output as it arrives.
    """
    if stop is None:
        stop = trio.Event()
    if stop.is_set():
        return ShellOutcome(text="[cancelled before the command started]", is_error=True)
    try:
        await client.call(
            "process/start",
            {
                "processId": process_id,
                "argv": list(argv),
                "cwd": cwd_uri,
                "env": {},
                "envPolicy": CORE_ENV_POLICY,
                "tty": False,
                "pipeStdin": False,
            },
        )
    except ExecServerError as exc:
        return ShellOutcome(text=f"[exec failed to start: {exc.message}]", is_error=True)

    progress = _Progress(streams={"stdout": _Stream(output_limit), "stderr": _Stream(output_limit)})
    try:
        with trio.move_on_after(time_limit) as deadline, single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, stop, nursery.cancel_scope)
                await _read_until_done(client, process_id, progress, on_output)
                nursery.cancel_scope.cancel()
    finally:
        if not progress.finished:
            # Time limit, cancellation or a broken read: do not leave the command running.
            await _terminate(client, process_id)

    return format_outcome(
        progress.streams["stdout"].text(),
        progress.streams["stderr"].text(),
        exit_code=progress.exit_code,
        failure=progress.failure,
        timed_out_after=time_limit if deadline.cancelled_caught else None,
        cancelled=not progress.finished and stop.is_set(),
    )


async def handle_shell(call: ToolCall, arguments: Mapping[str, Any]) -> ShellOutcome:
    """The ``shell`` tool's handler (``gateway/envmcp/specs.py``): one command, its output."""
    argv, cwd = parse_shell_arguments(arguments)
    cwd_uri = resolve_cwd(cwd, call.info)
    return await run_shell(
        call.client,
        process_id=call.new_process_id(),
        argv=argv,
        cwd_uri=cwd_uri,
        time_limit=call.time_limit,
        on_output=call.on_output,
        stop=call.stop,
    )
