"""``shell_command``: run a script on the executor to its end, within a time limit.

Output (stdout and stderr as they interleave) streams to the caller as progress notifications
and comes back bounded: its first and last ``max_output_bytes / 2`` bytes. At the time limit,
or when the call is cancelled, the remote process is killed before the answer is sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import trio

from gateway.envmcp.bridge import ExecServerError, single_errors
from gateway.envmcp.registry import TextOutcome, ToolCall
from gateway.envmcp.shell import _cancel_when_set, _terminate, resolve_cwd
from gateway.envmcp.tools import arguments as args
from gateway.envmcp.tools.output import HeadTail, tool_result
from gateway.envmcp.tools.process_io import (
    ProcessState,
    read_until,
    script_argv,
    start_process,
    status_line,
)

MAX_SCRIPT_BYTES = 256 * 1024
DEFAULT_TIMEOUT_MS = 30_000
DEFAULT_OUTPUT_BYTES = 64 * 1024
MAX_OUTPUT_BYTES = 256 * 1024
MIN_OUTPUT_BYTES = 1024
_KNOWN = ("command", "workdir", "timeout_ms", "login", "max_output_bytes")


@attrs.frozen
class ShellCommand:
    """Validated ``shell_command`` arguments; ``timeout_ms`` is capped later by env-mcp's limit."""

    command: str
    workdir: str | None
    timeout_ms: int | None
    login: bool
    max_output_bytes: int


def parse_arguments(arguments: Mapping[str, Any]) -> ShellCommand:
    """Check every argument's type and bound."""
    args.check_known(arguments, _KNOWN)
    command = args.text(
        arguments, "command", max_bytes=MAX_SCRIPT_BYTES, required=True, allow_empty=False
    )
    assert command is not None
    workdir = args.text(arguments, "workdir", max_bytes=args.MAX_PATH_CHARS)
    if workdir:
        args.check_path(workdir, "workdir")
    timeout_ms = None
    if arguments.get("timeout_ms") is not None:
        timeout_ms = args.integer(
            arguments, "timeout_ms", minimum=1, maximum=3_600_000, default=DEFAULT_TIMEOUT_MS
        )
    return ShellCommand(
        command=command,
        workdir=workdir or None,
        timeout_ms=timeout_ms,
        login=args.boolean(arguments, "login", default=False),
        max_output_bytes=args.integer(
            arguments,
            "max_output_bytes",
            minimum=MIN_OUTPUT_BYTES,
            maximum=MAX_OUTPUT_BYTES,
            default=DEFAULT_OUTPUT_BYTES,
        ),
    )


def time_limit_of(request: ShellCommand, ceiling: float) -> float:
    """The time limit in seconds: the one asked for, the default, never over ``ceiling``."""
    asked = request.timeout_ms / 1000 if request.timeout_ms else DEFAULT_TIMEOUT_MS / 1000
    return min(asked, ceiling)


async def handle(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """Run the script; the answer holds its bounded output and how it ended."""
    request = parse_arguments(arguments)
    client, info = call.client, call.info
    try:
        cwd_uri = resolve_cwd(request.workdir, info)
    except ValueError as exc:
        return tool_result(f"invalid arguments: workdir: {exc}", error=True)
    limit = time_limit_of(request, call.time_limit)
    state = ProcessState(process_id=call.new_process_id())
    if call.stop.is_set():
        return tool_result("[cancelled before the command started]", error=True)
    try:
        await start_process(
            client,
            process_id=state.process_id,
            argv=script_argv(info, request.command, login=request.login),
            cwd_uri=cwd_uri,
        )
    except ExecServerError as exc:
        return tool_result(f"[exec failed to start: {exc.message}]", error=True)

    out = HeadTail(request.max_output_bytes)
    deadline = trio.current_time() + limit
    try:
        with trio.move_on_at(deadline) as timer, single_errors():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, call.stop, nursery.cancel_scope)
                await read_until(client, state, out, deadline, call.on_output)
                nursery.cancel_scope.cancel()
    finally:
        if not state.finished:
            # Time limit, cancellation or a broken read: do not leave the command running.
            await _terminate(client, state.process_id)

    text = out.text()
    if text and not text.endswith("\n"):
        text += "\n"
    if state.lost_output:
        text += "[the executor dropped part of the output before it could be read]\n"
    if state.finished:
        return tool_result(
            text + status_line(state), error=bool(state.failure) or state.exit_code != 0
        )
    if call.stop.is_set():
        return tool_result(text + "[cancelled; the process was killed]", error=True)
    timed_out = timer.cancelled_caught or trio.current_time() >= deadline
    why = f"time limit of {limit:g}s reached" if timed_out else "output ended early"
    return tool_result(text + f"[{why}; the process was killed]", error=True)
