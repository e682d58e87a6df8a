"""Starting a process on the executor and reading its output, for the exec and session tools.

The ``process/*`` shapes are those of the pinned exec-server (see ``gateway.envmcp.shell``);
checked against the binary: ``process/write`` needs ``{processId, chunk (base64), writeId}`` (a
write without ``writeId`` is ``-32602 missing field``; a repeated ``writeId`` is written once)
and answers ``{status: accepted | unknownProcess | stdinClosed | starting}``; ``tty: true``
output comes as stream ``pty``; ``maxBytes`` of ``process/read`` is a budget of whole chunks (a
chunk larger than it still comes whole). ``closed`` can be reported while output is still
buffered: a process has been read to its end only once a read after ``closed`` returns no
chunk. The exec-server keeps about 1 MiB of a process's output; older chunks that were not read
in time are gone (a gap in ``seq``). A process whose connection closes is killed by the
exec-server.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from gateway.envmcp.bridge import BridgeError, EnvironmentInfo, ExecServerClient
from gateway.envmcp.registry import OnOutput
from gateway.envmcp.shell import CORE_ENV_POLICY, EXIT_GRACE, READ_MAX_BYTES, _decode_chunk
from gateway.envmcp.tools.output import HeadTail

READ_WAIT_MS = 1000
DEFAULT_SHELL = "/bin/sh"


def script_argv(info: EnvironmentInfo, script: str, *, login: bool) -> list[str]:
    """Run ``script`` with the executor's own shell, as codex's shell tools do."""
    return [info.shell_path or DEFAULT_SHELL, "-lc" if login else "-c", script]


async def start_process(
    client: ExecServerClient,
    *,
    process_id: str,
    argv: Sequence[str],
    cwd_uri: str,
    tty: bool = False,
    pipe_stdin: bool = False,
) -> None:
    """``process/start`` with the executor's core environment (none of its secrets)."""
    await client.call(
        "process/start",
        {
            "processId": process_id,
            "argv": list(argv),
            "cwd": cwd_uri,
            "env": {"TERM": "dumb"} if tty else {},
            "envPolicy": CORE_ENV_POLICY,
            "tty": tty,
            "pipeStdin": pipe_stdin,
        },
    )


@attrs.define
class ProcessState:
    """What is known of one remote process: the read cursor, its exit, its failure."""

    process_id: str
    after_seq: int = 0
    exit_code: int | None = None
    failure: str | None = None
    exited_at: float | None = None
    closed: bool = False
    # The last read returned no output: together with ``closed`` (or the exit grace) the end.
    idle: bool = False
    # Output the executor no longer had when it was asked for (a gap in the sequence).
    lost_output: bool = False
    # Sequence numbers that ``process/exited`` and ``process/closed`` may still take.
    event_seqs_left: int = 2

    @property
    def exited(self) -> bool:
        return self.exited_at is not None

    def grace_left(self) -> float:
        """How much longer to wait for output after the exit (0 when none was reported)."""
        if self.exited_at is None:
            return 0.0
        return max(0.0, self.exited_at + EXIT_GRACE - trio.current_time())

    @property
    def finished(self) -> bool:
        """Exited and its output drained (pipes closed, or the grace after the exit is over)."""
        return self.idle and (self.closed or (self.exited and self.grace_left() == 0.0))


def _apply(state: ProcessState, result: Any, out: HeadTail) -> bytes:
    if not isinstance(result, dict):
        raise BridgeError("exec-server sent a process/read result that is not an object")
    received = bytearray()
    chunks = result.get("chunks") or []
    state.idle = not chunks
    exited = bool(result.get("exited")) or state.exited
    for chunk in chunks:
        if not isinstance(chunk, dict):
            raise BridgeError("exec-server sent an output chunk that is not an object")
        seq = chunk.get("seq")
        if isinstance(seq, int):
            missing = seq - state.after_seq - 1
            if missing > 0 and exited and state.event_seqs_left >= missing:
                # The exit (and the close) take a number of the same sequence, and output
                # still draining from the pipes comes after it: that gap is no lost output.
                state.event_seqs_left -= missing
            elif missing > 0:
                state.lost_output = True
            state.after_seq = max(state.after_seq, seq)
        received += _decode_chunk(chunk.get("chunk"))
    out.add(bytes(received))
    next_seq = result.get("nextSeq")
    if isinstance(next_seq, int):
        # ``afterSeq`` is exclusive: the next read asks for what follows the last seen seq.
        state.after_seq = max(state.after_seq, next_seq - 1)
    if isinstance(result.get("failure"), str):
        state.failure = result["failure"]
    if result.get("exited"):
        code = result.get("exitCode")
        state.exit_code = code if isinstance(code, int) else None
        if state.exited_at is None:
            state.exited_at = trio.current_time()
    if result.get("closed"):
        state.closed = True
    return bytes(received)


async def read_until(
    client: ExecServerClient,
    state: ProcessState,
    out: HeadTail,
    deadline: float,
    on_output: OnOutput | None = None,
) -> None:
    """Collect output into ``out`` until the process has finished or ``deadline`` has come.

    At least one read is made, so a deadline already past still returns what is buffered.
    """
    while True:
        left = deadline - trio.current_time()
        wait = min(READ_WAIT_MS / 1000, max(left, 0.0))
        if state.closed:
            wait = 0.0  # only what is still buffered is left to read
        elif state.exited:
            wait = min(wait, state.grace_left())
        result = await client.call(
            "process/read",
            {
                "processId": state.process_id,
                "afterSeq": state.after_seq,
                "maxBytes": READ_MAX_BYTES,
                "waitMs": int(wait * 1000),
            },
        )
        received = _apply(state, result, out)
        if received and on_output is not None:
            await on_output(received.decode("utf-8", errors="replace"), out.total)
        if state.finished or trio.current_time() >= deadline:
            return


async def write_stdin(client: ExecServerClient, process_id: str, data: bytes, write_id: str) -> str:
    """``process/write``; returns the status the exec-server answered (``accepted``…)."""
    result = await client.call(
        "process/write",
        {
            "processId": process_id,
            "chunk": base64.b64encode(data).decode("ascii"),
            "writeId": write_id,
        },
    )
    status = result.get("status") if isinstance(result, dict) else None
    return status if isinstance(status, str) else "unknown"


def status_line(state: ProcessState) -> str:
    """The closing marker of a finished process, as the shell tool writes it."""
    parts = []
    if state.failure:
        parts.append(f"[exec failure: {state.failure}]")
    if state.exit_code is not None:
        parts.append(f"[exit_code={state.exit_code}]")
    else:
        parts.append("[exec ended without an exit code]")
    return "\n".join(parts)
