"""Bridge connections kept across tool calls, one per executor, for tools that need them.

exec-server 0.169.0 ties processes to the connection that started them: a new connection
answers ``unknown process id`` for them. A tool whose state outlives one call therefore runs on
the executor's kept connection (``ToolSpec.keep_connection``). Each is held open by a task of
``KeptConnections.run``'s nursery (so it ends with env-mcp), dialled at first use with a fresh
grant, used by one call at a time (the JSON-RPC client is sequential), and dropped when a call
finds it broken, so the next call redials. Idle ones stay: a workspace has a handful of
executors, and the bound is ``MAX_KEPT``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import trio

log = logging.getLogger(__name__)

MAX_KEPT = 64

Connect = Callable[[str], AbstractAsyncContextManager[Any]]


class KeptConnectionError(Exception):
    """More executors have kept connections than ``MAX_KEPT``."""


@attrs.define
class _Kept:
    connection: Any
    lock: trio.Lock = attrs.field(factory=trio.Lock)
    close: trio.Event = attrs.field(factory=trio.Event)
    broken: bool = False


class KeptConnections:
    """The kept connections of one env-mcp; ``connect`` opens one (a source's ``connect``)."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect
        self._kept: dict[str, _Kept] = {}
        self._dialling = trio.Lock()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the kept connections until cancelled (then they close)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _hold(self, environment_id: str, *, task_status: trio.TaskStatus[_Kept]) -> None:
        started = False
        try:
            async with self._connect(environment_id) as connection:
                kept = _Kept(connection)
                task_status.started(kept)
                started = True
                await kept.close.wait()
        except Exception as exc:
            if not started:
                raise
            # Closing a broken connection may fail too; the call that saw it has said so.
            log.debug("kept connection to %s closed with %s", environment_id, exc)

    @asynccontextmanager
    async def use(self, environment_id: str) -> AsyncIterator[Any]:
        """The kept connection to ``environment_id``, for one call; dialled when there is none.

        A dial failure is raised as the source raised it. A call that finds the connection
        broken calls :meth:`drop`, so the next call redials.
        """
        if self._nursery is None:
            raise RuntimeError("KeptConnections.run is not running")
        while True:
            async with self._dialling:
                kept = self._kept.get(environment_id)
                if kept is None:
                    if len(self._kept) >= MAX_KEPT:
                        raise KeptConnectionError(
                            f"more than {MAX_KEPT} executors have kept connections"
                        )
                    kept = await self._nursery.start(self._hold, environment_id)
                    self._kept[environment_id] = kept
            async with kept.lock:
                if kept.broken:
                    continue  # dropped while this call waited: dial afresh
                yield kept.connection
                return

    def drop(self, environment_id: str) -> None:
        """Close the kept connection to ``environment_id`` (it broke); the next use redials."""
        kept = self._kept.pop(environment_id, None)
        if kept is not None:
            kept.broken = True
            kept.close.set()
