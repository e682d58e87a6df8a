"""The exec-server's file methods, bounded: what read_file, write_file and apply_patch use.

Checked against the pinned exec-server 0.169.0 (the binary, not only the notes): ``fs/readFile
{path}`` → ``{dataBase64}`` (the whole file, unbounded), ``fs/open {handleId, path}`` →
``{handleId}``, ``fs/readBlock {handleId, offset, len ≤ 1 MiB}`` → ``{chunk (base64), eof}``,
``fs/close {handleId}``, ``fs/writeFile {path, dataBase64}`` → ``{}`` (the parent must exist),
``fs/getMetadata {path}`` → ``{isDirectory, isFile, isSymlink, size, …}`` (it follows
symlinks), ``fs/createDirectory {path, recursive}``, ``fs/remove {path, recursive, force}``.
Paths are ``file://`` URIs. A missing path is ``-32004``; ``fs/open``/``fs/readFile`` refuse
anything that is not a regular file (a directory, a FIFO, ``/dev/zero``) with ``-32600 … is not a
file``, so no read can block on a device. Reads go block by block through ``fs/open`` so a file
that grows while it is read still costs at most the bound.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import secrets
from typing import Any

import attrs
import trio

from gateway.envmcp.bridge import BridgeError, ExecServerClient, ExecServerError
from gateway.envmcp.tools.paths import ExecutorPath

FS_CALL_TIMEOUT = 30.0
BLOCK_BYTES = 1024 * 1024
NOT_FOUND = -32004
_handles = (f"envmcp-h{secrets.token_hex(4)}-{n}" for n in itertools.count(1))


class FsError(Exception):
    """A file operation the executor refused; ``str`` is one sentence for the model."""


async def fs_call(client: ExecServerClient, method: str, params: dict[str, Any]) -> Any:
    """One ``fs/*`` call with a time limit, so a stuck executor costs a bounded wait."""
    try:
        with trio.fail_after(FS_CALL_TIMEOUT):
            return await client.call(method, params)
    except trio.TooSlowError:
        raise BridgeError(
            f"the executor did not answer {method} within {FS_CALL_TIMEOUT:g}s"
        ) from None


@attrs.frozen
class Metadata:
    is_directory: bool
    is_file: bool
    size: int


async def metadata(client: ExecServerClient, path: ExecutorPath) -> Metadata | None:
    """What ``path`` is, or ``None`` if nothing is there."""
    try:
        result = await fs_call(client, "fs/getMetadata", {"path": path.uri})
    except ExecServerError as exc:
        if exc.code == NOT_FOUND:
            return None
        raise FsError(f"cannot inspect {path.path}: {exc.message}") from None
    if not isinstance(result, dict):
        raise BridgeError("exec-server sent an fs/getMetadata result that is not an object")
    size = result.get("size")
    return Metadata(
        is_directory=result.get("isDirectory") is True,
        is_file=result.get("isFile") is True,
        size=size if isinstance(size, int) else 0,
    )


def _decode(value: Any, method: str) -> bytes:
    if not isinstance(value, str):
        raise BridgeError(f"exec-server sent an {method} result without base64 data")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BridgeError(f"exec-server sent invalid base64 in an {method} result") from None


async def read_bounded(
    client: ExecServerClient, path: ExecutorPath, limit: int
) -> tuple[bytes, bool]:
    """The first ``limit`` bytes of the regular file at ``path``, and whether there is more."""
    handle = next(_handles)
    try:
        await fs_call(client, "fs/open", {"handleId": handle, "path": path.uri})
    except ExecServerError as exc:
        if exc.code == NOT_FOUND:
            raise FsError(f"{path.path} does not exist") from None
        raise FsError(f"cannot read {path.path}: {exc.message}") from None
    data = bytearray()
    try:
        while len(data) <= limit:
            want = min(BLOCK_BYTES, limit + 1 - len(data))
            try:
                result = await fs_call(
                    client, "fs/readBlock", {"handleId": handle, "offset": len(data), "len": want}
                )
            except ExecServerError as exc:
                raise FsError(f"cannot read {path.path}: {exc.message}") from None
            if not isinstance(result, dict):
                raise BridgeError("exec-server sent an fs/readBlock result that is not an object")
            chunk = _decode(result.get("chunk"), "fs/readBlock")
            data += chunk
            if result.get("eof") is True or not chunk:
                break
    finally:
        # A handle that cannot be closed goes with its connection.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(5),
            contextlib.suppress(BridgeError),
        ):
            await client.call("fs/close", {"handleId": handle})
    return bytes(data[:limit]), len(data) > limit


async def write_bytes(client: ExecServerClient, path: ExecutorPath, data: bytes) -> None:
    """Write ``data`` to ``path`` (its parent must exist)."""
    try:
        await fs_call(
            client,
            "fs/writeFile",
            {"path": path.uri, "dataBase64": base64.b64encode(data).decode("ascii")},
        )
    except ExecServerError as exc:
        raise FsError(f"cannot write {path.path}: {exc.message}") from None


async def ensure_directory(client: ExecServerClient, path: ExecutorPath) -> None:
    """Make ``path`` a directory if nothing is there; refuse if something else is."""
    found = await metadata(client, path)
    if found is not None:
        if not found.is_directory:
            raise FsError(f"{path.path} exists and is not a directory")
        return
    try:
        await fs_call(client, "fs/createDirectory", {"path": path.uri, "recursive": True})
    except ExecServerError as exc:
        raise FsError(f"cannot create the directory {path.path}: {exc.message}") from None


async def remove_file(client: ExecServerClient, path: ExecutorPath) -> None:
    """Remove the file at ``path`` (never a directory)."""
    try:
        await fs_call(client, "fs/remove", {"path": path.uri, "recursive": False, "force": False})
    except ExecServerError as exc:
        raise FsError(f"cannot delete {path.path}: {exc.message}") from None
