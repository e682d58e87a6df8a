"""Interactive processes on the executor: ``exec_command``, ``write_stdin``, ``terminate_session``.

A process started by ``exec_command`` outlives the call: it is a *session* in env-mcp's
:data:`TABLE`, running on its executor's kept connection (the tools have ``keep_connection``:
exec-server processes belong to the connection that started them). Later calls write to its
stdin and read the output that came since the last read, each waiting at most
``yield_time_ms``.

Bounds: at most :data:`MAX_SESSIONS` sessions at once; every read waits at most 30 s and
returns at most ``max_output_bytes``; a write carries at most :data:`MAX_WRITE_BYTES`. A session
ends when its process has exited and been read to the end, when it is terminated, when its
connection breaks, or when env-mcp ends (:meth:`SessionTable.aclose` kills each process before
the kept connections close; if env-mcp is killed instead, its connections drop and the
exec-server kills the processes itself, about 80 s later).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import attrs
import trio

from gateway.envmcp.bridge import (
    BridgeError,
    EnvironmentInfo,
    ExecServerClient,
    ExecServerError,
    single_errors,
)
from gateway.envmcp.registry import TextOutcome, ToolCall
from gateway.envmcp.shell import TERMINATE_TIMEOUT, _cancel_when_set, _terminate, resolve_cwd
from gateway.envmcp.tools import arguments as args
from gateway.envmcp.tools.output import HeadTail, tool_result
from gateway.envmcp.tools.process_io import (
    ProcessState,
    read_until,
    script_argv,
    start_process,
    status_line,
    write_stdin,
)

log = logging.getLogger(__name__)

MAX_SESSIONS = 8
MAX_COMMAND_BYTES = 64 * 1024
MAX_WRITE_BYTES = 64 * 1024
MAX_YIELD_MS = 30_000
DEFAULT_START_YIELD_MS = 2_000
DEFAULT_WRITE_YIELD_MS = 1_000
DEFAULT_OUTPUT_BYTES = 16 * 1024
MAX_OUTPUT_BYTES = 256 * 1024
MIN_OUTPUT_BYTES = 1024
# After process/terminate, how long to wait for the last output and the exit status.
FINAL_READ = 2.0

#: The kept connection to an executor, for one use (``KeptConnections.use``).
Use = Callable[[str], AbstractAsyncContextManager[tuple[ExecServerClient, EnvironmentInfo]]]


# -- arguments ---------------------------------------------------------------------------------


@attrs.frozen
class StartRequest:
    cmd: str
    workdir: str | None
    tty: bool
    login: bool
    yield_ms: int
    max_output_bytes: int


@attrs.frozen
class WriteRequest:
    session_id: int
    chars: str
    yield_ms: int
    max_output_bytes: int


@attrs.frozen
class TerminateRequest:
    session_id: int


def _yield_ms(arguments: Mapping[str, Any], default: int) -> int:
    return args.integer(
        arguments, "yield_time_ms", minimum=0, maximum=MAX_YIELD_MS, default=default
    )


def _output_bytes(arguments: Mapping[str, Any]) -> int:
    return args.integer(
        arguments,
        "max_output_bytes",
        minimum=MIN_OUTPUT_BYTES,
        maximum=MAX_OUTPUT_BYTES,
        default=DEFAULT_OUTPUT_BYTES,
    )


def _session_id(arguments: Mapping[str, Any]) -> int:
    if arguments.get("session_id") is None:
        raise ValueError("session_id is required")
    return args.integer(arguments, "session_id", minimum=1, maximum=2**31, default=0)


def parse_start(arguments: Mapping[str, Any]) -> StartRequest:
    """Validate ``exec_command``'s arguments."""
    args.check_known(
        arguments, ("cmd", "workdir", "tty", "login", "yield_time_ms", "max_output_bytes")
    )
    cmd = args.text(arguments, "cmd", max_bytes=MAX_COMMAND_BYTES, required=True, allow_empty=False)
    assert cmd is not None
    workdir = args.text(arguments, "workdir", max_bytes=args.MAX_PATH_CHARS)
    if workdir:
        args.check_path(workdir, "workdir")
    return StartRequest(
        cmd=cmd,
        workdir=workdir or None,
        tty=args.boolean(arguments, "tty", default=False),
        login=args.boolean(arguments, "login", default=False),
        yield_ms=_yield_ms(arguments, DEFAULT_START_YIELD_MS),
        max_output_bytes=_output_bytes(arguments),
    )


def parse_write(arguments: Mapping[str, Any]) -> WriteRequest:
    """Validate ``write_stdin``'s arguments."""
    args.check_known(arguments, ("session_id", "chars", "yield_time_ms", "max_output_bytes"))
    session_id = _session_id(arguments)
    value = arguments.get("chars")
    if value is not None and not isinstance(value, str):
        raise ValueError("chars must be a string")
    chars = value or ""
    try:
        size = len(chars.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("chars must be valid Unicode text (it has a lone surrogate)") from None
    if size > MAX_WRITE_BYTES:
        raise ValueError(f"chars is {size} bytes; at most {MAX_WRITE_BYTES} are written at once")
    return WriteRequest(
        session_id=session_id,
        chars=chars,
        yield_ms=_yield_ms(arguments, DEFAULT_WRITE_YIELD_MS),
        max_output_bytes=_output_bytes(arguments),
    )


def parse_terminate(arguments: Mapping[str, Any]) -> TerminateRequest:
    """Validate ``terminate_session``'s arguments."""
    args.check_known(arguments, ("session_id",))
    return TerminateRequest(session_id=_session_id(arguments))


# -- the table ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class Session:
    """One interactive process: the executor it runs on and what has been read of it."""

    session_id: int
    environment_id: str
    state: ProcessState
    write_ids: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))


class SessionTable:
    """env-mcp's interactive sessions, on the executors' kept connections.

    A call reaches the table with ``call.client``, the kept connection of the executor it names,
    held for that call alone: two calls on one executor never interleave their reads.
    """

    def __init__(self) -> None:
        self._sessions: dict[int, Session] = {}
        self._ids = itertools.count(1)

    def running(self) -> list[Session]:
        """The sessions not ended yet, oldest first."""
        return [self._sessions[n] for n in sorted(self._sessions)]

    async def start(self, call: ToolCall, request: StartRequest) -> TextOutcome:
        """Start ``request.cmd`` in a new session and read its first output."""
        if len(self._sessions) >= MAX_SESSIONS:
            running = ", ".join(str(n) for n in sorted(self._sessions))
            return tool_result(
                f"too many sessions: {MAX_SESSIONS} are running ({running}); end one with "
                "terminate_session first",
                error=True,
            )
        try:
            cwd_uri = resolve_cwd(request.workdir, call.info)
        except ValueError as exc:
            return tool_result(f"invalid arguments: workdir: {exc}", error=True)
        if call.stop.is_set():
            return tool_result("[cancelled before the command started]", error=True)
        state = ProcessState(process_id=call.new_process_id())
        try:
            await start_process(
                call.client,
                process_id=state.process_id,
                argv=script_argv(call.info, request.cmd, login=request.login),
                cwd_uri=cwd_uri,
                tty=request.tty,
                pipe_stdin=not request.tty,
            )
        except ExecServerError as exc:
            return tool_result(f"[exec failed to start: {exc.message}]", error=True)
        except BridgeError:
            self._lost(call.environment_id)
            raise
        session = Session(next(self._ids), call.environment_id, state)
        self._sessions[session.session_id] = session
        log.info("session %s started on executor %s", session.session_id, call.environment_id)
        return await self._read(call, session, request.yield_ms, request.max_output_bytes)

    def get(self, session_id: int) -> Session | None:
        """The running session ``session_id``, if there is one."""
        return self._sessions.get(session_id)

    def unknown_text(self, session_id: int) -> str:
        """What a call naming a session that is not running is told."""
        running = ", ".join(str(n) for n in sorted(self._sessions)) or "none"
        return f"there is no session {session_id} (it ended or never existed); running: {running}"

    def _get(self, call: ToolCall, session_id: int) -> Session | TextOutcome:
        session = self._sessions.get(session_id)
        if session is None:
            # It ended while this call waited for the connection.
            return tool_result(self.unknown_text(session_id), error=True)
        if session.environment_id != call.environment_id:
            return tool_result(
                f"session {session_id} runs on executor {session.environment_id}, not on "
                f"{call.environment_id}; call it with environment_id {session.environment_id}",
                error=True,
            )
        return session

    async def write(self, call: ToolCall, request: WriteRequest) -> TextOutcome:
        """Write ``request.chars`` (if any) and read the output since the last read."""
        session = self._get(call, request.session_id)
        if not isinstance(session, Session):
            return session
        note = ""
        if request.chars:
            write_id = f"w{next(session.write_ids)}"
            try:
                status = await write_stdin(
                    call.client, session.state.process_id, request.chars.encode(), write_id
                )
            except ExecServerError as exc:
                return self._forgotten(session, exc)
            except BridgeError:
                self._lost(call.environment_id)
                raise
            if status == "stdinClosed":
                note = f"[stdin of session {session.session_id} is closed; nothing written]"
            elif status not in ("accepted", "starting"):
                # The exec-server no longer knows the process; the read below says how it ended.
                log.info("write to session %s answered %s", session.session_id, status)
        return await self._read(
            call, session, request.yield_ms, request.max_output_bytes, note=note
        )

    async def terminate(self, call: ToolCall, request: TerminateRequest) -> TextOutcome:
        """Kill the session's process and report its last output and exit."""
        session = self._get(call, request.session_id)
        if not isinstance(session, Session):
            return session
        try:
            await call.client.call("process/terminate", {"processId": session.state.process_id})
        except ExecServerError as exc:
            return self._forgotten(session, exc)
        except BridgeError:
            self._lost(call.environment_id)
            raise
        return await self._read(
            call, session, int(FINAL_READ * 1000), DEFAULT_OUTPUT_BYTES, ending=True
        )

    def _lost(self, environment_id: str) -> None:
        """The kept connection to ``environment_id`` broke: its sessions went with it."""
        for session in self.running():
            if session.environment_id == environment_id:
                del self._sessions[session.session_id]
                log.warning("session %s lost its executor connection", session.session_id)

    def _forgotten(self, session: Session, exc: ExecServerError) -> TextOutcome:
        """The exec-server no longer knows the process (its connection was redialled)."""
        self._sessions.pop(session.session_id, None)
        return tool_result(
            f"session {session.session_id} ended: executor {session.environment_id} no longer "
            f"knows its process ({exc.message})",
            error=True,
        )

    async def _read(
        self,
        call: ToolCall,
        session: Session,
        yield_ms: int,
        max_output_bytes: int,
        *,
        note: str = "",
        ending: bool = False,
    ) -> TextOutcome:
        out = HeadTail(max_output_bytes)
        deadline = trio.current_time() + yield_ms / 1000
        try:
            with trio.move_on_at(deadline + TERMINATE_TIMEOUT), single_errors():
                async with trio.open_nursery() as nursery:
                    # A cancelled call stops waiting; the session lives on.
                    nursery.start_soon(_cancel_when_set, call.stop, nursery.cancel_scope)
                    await read_until(call.client, session.state, out, deadline)
                    nursery.cancel_scope.cancel()
        except ExecServerError as exc:
            return self._forgotten(session, exc)
        except BridgeError:
            self._lost(call.environment_id)
            raise
        state = session.state
        text = out.text()
        if state.lost_output:
            text = "[earlier output was no longer kept by the executor]\n" + text
            state.lost_output = False
        if text and not text.endswith("\n"):
            text += "\n"
        if note:
            text += note + "\n"
        if state.finished or ending:
            self._sessions.pop(session.session_id, None)
            verb = "terminated" if ending else "ended"
            closing = status_line(state) if state.exited else "[no exit status was reported]"
            failed = bool(state.failure) or state.exit_code != 0
            return tool_result(
                f"{text}{closing}\n[session {session.session_id} {verb}]",
                error=failed and not ending,
            )
        return tool_result(
            f"{text}[session {session.session_id} is running; write_stdin with session_id "
            f"{session.session_id} sends input or reads more output]"
        )

    async def aclose(self, use: Use) -> None:
        """End every session: kill its process over its executor's kept connection (bounded).

        Called as env-mcp ends, before the kept connections close: exec-server 0.169.0 does
        not kill a closed connection's processes at once.
        """
        with trio.CancelScope(shield=True), trio.move_on_after(TERMINATE_TIMEOUT + 5):
            for session in self.running():
                del self._sessions[session.session_id]
                try:
                    async with use(session.environment_id) as (client, _info):
                        await _terminate(client, session.state.process_id)
                except Exception as exc:  # ending is best effort: the connection may be gone
                    log.info("could not end session %s: %s", session.session_id, exc)


#: env-mcp's one table: this module is imported at the first session call and lives as long
#: as env-mcp does.
TABLE = SessionTable()


# -- checks before dialling --------------------------------------------------------------------


def _known(session_id: int) -> None:
    """Refuse a session that is not running before any bridge is dialled for it."""
    if TABLE.get(session_id) is None:
        raise ValueError(TABLE.unknown_text(session_id))


def check_write(arguments: Mapping[str, Any]) -> None:
    """``write_stdin``'s ``validate``: good arguments, and a session that is running."""
    _known(parse_write(arguments).session_id)


def check_terminate(arguments: Mapping[str, Any]) -> None:
    """``terminate_session``'s ``validate``: good arguments, and a session that is running."""
    _known(parse_terminate(arguments).session_id)


# -- handlers ----------------------------------------------------------------------------------


async def handle_start(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """``exec_command``."""
    return await TABLE.start(call, parse_start(arguments))


async def handle_write(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """``write_stdin``."""
    return await TABLE.write(call, parse_write(arguments))


async def handle_terminate(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """``terminate_session``."""
    return await TABLE.terminate(call, parse_terminate(arguments))
