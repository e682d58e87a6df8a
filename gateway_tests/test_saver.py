"""The saver's own rules, on the local store: a stopped session never fences itself out."""

from __future__ import annotations

from collections.abc import AsyncIterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import attrs
import trio

from gateway.codex_home.persistence import Persistence
from gateway.config import RestoreLimits
from gateway.sessions.saver import FinalSave, Saver
from gateway.store.base import ObjectStore, StoredObject
from gateway.store.local import LocalDirectoryStore

LIMITS = RestoreLimits(max_total_bytes=1 << 20, max_entries=100)


@attrs.define(eq=False)
class AnswerHeldBack:
    """A real store whose writes land at once but whose answer waits for ``release``.

    That wait is where a cancellation meets a write the store has already taken.
    """

    inner: ObjectStore
    landed: trio.Event = attrs.field(factory=trio.Event)
    release: trio.Event = attrs.field(factory=trio.Event)
    hold: bool = True

    def describe(self) -> str:
        return self.inner.describe()

    async def check(self) -> None:
        await self.inner.check()

    def open_read(self, key: str) -> AbstractAsyncContextManager[StoredObject]:
        return self.inner.open_read(key)

    async def write(
        self, key: str, chunks: AsyncIterable[bytes], *, expected_generation: str | None
    ) -> str:
        generation = await self.inner.write(key, chunks, expected_generation=expected_generation)
        if self.hold:
            self.landed.set()
            await self.release.wait()
        return generation

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_checkpoint_caught_by_the_stop_after_it_landed_still_counts(
    tmp_path: Path,
) -> None:
    store = AnswerHeldBack(LocalDirectoryStore(str(tmp_path / "store")))
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "history.jsonl").write_text('{"text":"one"}\n')
    saver = Saver("ws_stop", Persistence(store, LIMITS), home)
    with trio.fail_after(20):
        async with trio.open_nursery() as session:
            session.start_soon(saver.checkpoint)
            await store.landed.wait()
            # The session stops while the store's answer is on its way.
            session.cancel_scope.cancel()
            store.release.set()
        store.hold = False
        (home / "history.jsonl").write_text('{"text":"one"}\n{"text":"two"}\n')
        # Fenced on the checkpoint's generation, the final save is this session's next write,
        # not a lost race with somebody else.
        assert await saver.final_save(child_ran=True) is FinalSave.SAVED


async def test_abandon_ends_a_checkpoint_still_running(tmp_path: Path) -> None:
    store = AnswerHeldBack(LocalDirectoryStore(str(tmp_path / "store")))
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "history.jsonl").write_text('{"text":"one"}\n')
    saver = Saver("ws_abandon", Persistence(store, LIMITS), home)
    with trio.fail_after(20):
        async with trio.open_nursery() as session:
            session.start_soon(saver.checkpoint)
            await store.landed.wait()
            session.cancel_scope.cancel()
            # The answer never comes; the drain budget gives up instead.
            saver.abandon()
