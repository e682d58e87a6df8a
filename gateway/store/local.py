"""A local directory object store: the embedded default when no S3 bucket is configured."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from gateway.store.base import ObjectNotFound, PreconditionFailed


@attrs.frozen
class _LocalObject:
    path: Path
    generation: str

    async def chunks(self) -> AsyncIterator[bytes]:
        data = await trio.Path(self.path).read_bytes()
        yield data


def _generation(path: Path) -> str:
    info = path.stat()
    return f"{info.st_mtime_ns:x}-{info.st_size:x}-{info.st_ino:x}"


class LocalDirectoryStore:
    """Objects as files under one directory; generations from file metadata."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"local:{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    @asynccontextmanager
    async def open_read(self, key: str) -> AsyncIterator[_LocalObject]:
        path = self._path(key)
        try:
            generation = _generation(path)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        yield _LocalObject(path=path, generation=generation)

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, expected_generation: str | None
    ) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            current: str | None = _generation(path)
        except FileNotFoundError:
            current = None
        if current != expected_generation:
            raise PreconditionFailed(key)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as out:
            async for chunk in chunks:
                out.write(chunk)
        os.replace(tmp, path)
        return _generation(path)

    async def aclose(self) -> None:
        return None
