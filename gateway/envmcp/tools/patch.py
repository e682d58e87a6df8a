"""``apply_patch``: codex's patch format, applied on the executor through its file methods.

exec-server 0.169.0 has no patch method (its ``fs/*`` methods read, write, list, copy and remove
files), so the patch is parsed and applied here (``patch_format``) on top of them: every file
the patch touches is read first and every hunk applied in memory; only if all of them apply is
anything written, added files first, then updated, then deleted. A write that fails half way is
reported with the files already changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from gateway.envmcp.bridge import EnvironmentInfo, ExecServerClient
from gateway.envmcp.registry import TextOutcome, ToolCall
from gateway.envmcp.tools import arguments as args
from gateway.envmcp.tools.files import MAX_READ_BYTES, decode_text
from gateway.envmcp.tools.fs import (
    FsError,
    ensure_directory,
    metadata,
    read_bounded,
    remove_file,
    write_bytes,
)
from gateway.envmcp.tools.output import tool_result
from gateway.envmcp.tools.patch_format import (
    AddFile,
    DeleteFile,
    Operation,
    PatchError,
    UpdateFile,
    apply_hunks,
    parse_patch,
)
from gateway.envmcp.tools.paths import ExecutorPath, resolve_path

MAX_PATCH_BYTES = 1024 * 1024


@attrs.frozen
class PatchRequest:
    operations: tuple[Operation, ...]


def parse_arguments(arguments: Mapping[str, Any]) -> PatchRequest:
    """Validate the argument and the patch's syntax (nothing on the executor is read yet)."""
    args.check_known(arguments, ("input",))
    text = args.text(arguments, "input", max_bytes=MAX_PATCH_BYTES, required=True)
    assert text is not None
    operations = parse_patch(text)
    for op in operations:
        args.plain_path(op.path, "a path in the patch")
        if isinstance(op, UpdateFile) and op.move_to is not None:
            args.plain_path(op.move_to, "a path in the patch")
    return PatchRequest(operations)


@attrs.frozen
class _Change:
    """One effect to carry out: write ``data`` to ``path`` or (``data is None``) delete it."""

    letter: str
    path: ExecutorPath
    data: bytes | None
    remove_after: ExecutorPath | None = None


async def _read_text(client: ExecServerClient, path: ExecutorPath) -> str:
    data, truncated = await read_bounded(client, path, MAX_READ_BYTES)
    if truncated:
        raise FsError(f"{path.path} is larger than {MAX_READ_BYTES} bytes; too large to patch")
    text = decode_text(data, truncated=False)
    if text is None:
        raise FsError(f"{path.path} is a binary file; apply_patch edits text files only")
    return text


async def _plan(
    client: ExecServerClient, info: EnvironmentInfo, operations: tuple[Operation, ...]
) -> list[_Change]:
    """Read what the patch touches and compute every file's new content; write nothing."""
    changes: list[_Change] = []
    for op in operations:
        path = resolve_path(op.path, info, "a path in the patch")
        if isinstance(op, AddFile):
            if await metadata(client, path) is not None:
                raise FsError(f"{path.path} already exists; change it with Update File")
            changes.append(_Change("A", path, op.content.encode("utf-8")))
        elif isinstance(op, DeleteFile):
            found = await metadata(client, path)
            if found is None:
                raise FsError(f"{path.path} does not exist, so it cannot be deleted")
            if not found.is_file:
                raise FsError(f"{path.path} is not a file; Delete File deletes files only")
            changes.append(_Change("D", path, None))
        else:
            original = await _read_text(client, path)
            updated = apply_hunks(original, op.hunks, op.path) if op.hunks else original
            target = path
            if op.move_to is not None:
                target = resolve_path(op.move_to, info, "a path in the patch")
                if target.path != path.path and await metadata(client, target) is not None:
                    raise FsError(f"{target.path} already exists; Move to needs a new path")
            moved = target.path != path.path
            changes.append(
                _Change("M", target, updated.encode("utf-8"), remove_after=path if moved else None)
            )
    return changes


async def _carry_out(client: ExecServerClient, changes: list[_Change], done: list[str]) -> None:
    """Write, then delete; ``done`` lists each change as it is made (for a partial failure)."""
    order = {"A": 0, "M": 1, "D": 2}
    for change in sorted(changes, key=lambda c: order[c.letter]):
        if change.data is None:
            await remove_file(client, change.path)
        else:
            await ensure_directory(client, change.path.parent)
            await write_bytes(client, change.path, change.data)
            if change.remove_after is not None:
                await remove_file(client, change.remove_after)
        done.append(f"{change.letter} {change.path.path}")


async def handle(call: ToolCall, arguments: Mapping[str, Any]) -> TextOutcome:
    """Apply the patch; the answer lists the files added (A), modified (M) and deleted (D)."""
    request = parse_arguments(arguments)
    try:
        changes = await _plan(call.client, call.info, request.operations)
    except (PatchError, FsError, ValueError) as exc:
        return tool_result(f"the patch was not applied; nothing was changed: {exc}", error=True)
    done: list[str] = []
    try:
        await _carry_out(call.client, changes, done)
    except FsError as exc:
        already = "; ".join(done) if done else "none"
        return tool_result(
            f"the patch was applied only in part ({exc}); changed before that: {already}",
            error=True,
        )
    return tool_result("Success. Updated the following files:\n" + "\n".join(done))
