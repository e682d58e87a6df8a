"""``read_file`` and ``write_file`` on the executor.

read_file reads at most :data:`MAX_READ_BYTES` of a regular file, refuses binary content (a NUL
byte or invalid UTF-8), and returns a line range with ``L<n>: `` prefixes, each line and the
whole answer bounded. write_file writes at most :data:`MAX_WRITE_BYTES`, creating missing parent
directories, and refuses to replace a directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from gateway.envmcp.registry import TextOutcome, ToolCall
from gateway.envmcp.tools import arguments as args
from gateway.envmcp.tools.fs import (
    FsError,
    ensure_directory,
    metadata,
    read_bounded,
    write_bytes,
)
from gateway.envmcp.tools.output import tool_result
from gateway.envmcp.tools.paths import resolve_path

MAX_READ_BYTES = 4 * 1024 * 1024
MAX_WRITE_BYTES = 1024 * 1024
DEFAULT_LINES = 2000
MAX_LINES = 10_000
MAX_LINE_CHARS = 2000
MAX_ANSWER_CHARS = 128 * 1024


@attrs.frozen
class ReadRequest:
    path: str
    offset: int
    limit: int


@attrs.frozen
class WriteRequest:
    path: str
    content: str


def parse_read(arguments: Mapping[str, Any]) -> ReadRequest:
    """Validate ``read_file``'s arguments."""
    args.check_known(arguments, ("path", "offset", "limit"))
    return ReadRequest(
        path=args.path(arguments),
        offset=args.integer(arguments, "offset", minimum=1, maximum=10**9, default=1),
        limit=args.integer(arguments, "limit", minimum=1, maximum=MAX_LINES, default=DEFAULT_LINES),
    )


def parse_write(arguments: Mapping[str, Any]) -> WriteRequest:
    """Validate ``write_file``'s arguments."""
    args.check_known(arguments, ("path", "content"))
    content = args.text(arguments, "content", max_bytes=MAX_WRITE_BYTES, required=True)
    assert content is not None
    return WriteRequest(path=args.path(arguments), content=content)


def decode_text(data: bytes, *, truncated: bool) -> str | None:
    """``data`` as text, or ``None`` if it is binary (NUL bytes, or not UTF-8)."""
    if b"\x00" in data:
        return None
    if truncated:
        # The bound may have cut the last character in two; that is not binary.
        for cut in range(4):
            try:
                return data[: len(data) - cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def split_lines(text: str) -> list[str]:
    """Lines as the patch format sees them: split on ``\\n`` only, no final empty line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def render_lines(
    display: str, text: str, offset: int, limit: int, *, truncated: bool
) -> tuple[str, bool]:
    """The ``L<n>: `` listing of ``limit`` lines from ``offset``; ``(text, is_error)``."""
    lines = split_lines(text)
    if not lines:
        return f"[{display} is empty]", False
    if offset > len(lines):
        if truncated:
            return (
                f"offset {offset} is beyond the first {MAX_READ_BYTES // (1024 * 1024)} MiB of "
                f"{display} ({len(lines)} lines), which is what read_file reads; use "
                "shell_command (e.g. sed -n) for the rest",
                True,
            )
        return f"offset {offset} is past the end of {display} ({len(lines)} lines)", True
    shown: list[str] = []
    size = 0
    last = min(len(lines), offset - 1 + limit)
    number = offset
    for number in range(offset, last + 1):
        line = lines[number - 1]
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + f" […{len(line) - MAX_LINE_CHARS} more characters]"
        entry = f"L{number}: {line}"
        if size + len(entry) + 1 > MAX_ANSWER_CHARS and shown:
            number -= 1
            break
        shown.append(entry)
        size += len(entry) + 1
    else:
        number = last
    notes = []
    if number < len(lines):
        notes.append(f"[{len(lines) - number} more lines; read on with offset {number + 1}]")
    elif truncated:
        notes.append(
            f"[{display} is longer than {MAX_READ_BYTES // (1024 * 1024)} MiB; only its start "
            "was read — use shell_command (e.g. tail, sed -n) for the rest]"
        )
    return "\n".join(shown + notes), False


async def handle_read(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """Read the file and answer with its numbered lines."""
    request = parse_read(arguments)
    try:
        path = resolve_path(request.path, call.info)
    except ValueError as exc:
        return tool_result(f"invalid arguments: {exc}", error=True)
    try:
        data, truncated = await read_bounded(call.client, path, MAX_READ_BYTES)
    except FsError as exc:
        return tool_result(str(exc), error=True)
    text = decode_text(data, truncated=truncated)
    if text is None:
        more = "+" if truncated else ""
        return tool_result(
            f"{path.path} is a binary file ({len(data)}{more} bytes); read_file shows text only",
            error=True,
        )
    answer, failed = render_lines(
        path.path, text, request.offset, request.limit, truncated=truncated
    )
    return tool_result(answer, error=failed)


async def handle_write(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """Write the file, creating its parent directories."""
    request = parse_write(arguments)
    try:
        path = resolve_path(request.path, call.info)
    except ValueError as exc:
        return tool_result(f"invalid arguments: {exc}", error=True)
    data = request.content.encode("utf-8")
    try:
        existing = await metadata(call.client, path)
        if existing is not None and not existing.is_file:
            what = "a directory" if existing.is_directory else "not a regular file"
            return tool_result(f"{path.path} is {what}; write_file writes files only", error=True)
        await ensure_directory(call.client, path.parent)
        await write_bytes(call.client, path, data)
    except FsError as exc:
        return tool_result(str(exc), error=True)
    verb = "replaced" if existing is not None else "created"
    return tool_result(f"wrote {len(data)} bytes to {path.path} ({verb})")
