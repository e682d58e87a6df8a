"""Saving one session's CODEX_HOME: the restore, checkpoints, the retried final save.

A session holds one ``Saver``. It owns what the session knows about its stored archive (the
``Generation``), so every write is fenced on the last one; it serialises saves (a checkpoint
and the final save never overlap); and it runs the final save in its own shielded scope,
retried with back-off, until it succeeds, is superseded, or is given up.

An adopted home (the unsaved home of the workspace's previous session, kept while the store
was unreachable) is not restored: the saver starts from that session's generation, so its
next save is fenced exactly as the previous session's would have been.

Two ways to give up the final save, both leaving the home on disk:

* ``hand_over``: a reconnect needs this home. Only a final save that has already failed is
  given up (a store that fails once is likely down; the new session adopts the home). A first
  attempt still under way is waited for: a slow upload is not a failing store, and abandoning
  it would leave the store one snapshot behind.
* ``abandon``: the drain budget is exhausted; the save ends now.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

import structlog
import trio

from gateway import metrics
from gateway.codex_home.persistence import Generation, Persistence, ReadAs, StaleSnapshot
from gateway.codex_home.relocate import relocate_codex_home
from gateway.replicas.placement import Snapshots
from gateway.sessions.outcome import Unsaved

log = structlog.get_logger(__name__)

FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 60.0


class FinalSave(enum.Enum):
    """What the final save ended with."""

    SAVED = "saved"
    SUPERSEDED = "superseded"
    UNSAVED = "unsaved"


class Saver:
    """The one owner of a session's saves; see the module docstring."""

    def __init__(
        self,
        workspace_id: str,
        persistence: Persistence,
        codex_home: Path,
        adopted: Unsaved | None = None,
        *,
        recorded_home: Path | None = None,
    ) -> None:
        self._workspace_id = workspace_id
        self._persistence = persistence
        self._codex_home = codex_home
        # Where the archived state databases say the home is (the Go layout, for rollback).
        self._recorded_home = recorded_home
        #: How the live home is read for a snapshot (the child's file ids), set by the session
        #: once its child's identity is known; ``None`` reads as the gateway.
        self.read_as: ReadAs | None = None
        #: Replica mode: commit-fenced restore and saves, set by the session once it holds the
        #: workspace; ``None`` reads and writes the archive key itself, fenced on its ETag.
        self.snapshots: Snapshots | None = None
        #: False when the session never came to hold its workspace (replica mode: owned
        #: elsewhere, or undecided): an adopted home is then kept on disk, never written.
        self.may_write = True
        self._adopted = adopted is not None
        self.generation = adopted.generation if adopted is not None else Generation(stored=None)
        self.last_checkpoint: float | None = None
        self.last_error: str | None = None
        self._superseded = False
        self._lock = trio.Lock()
        self._final_scope = trio.CancelScope(shield=True)
        self._checkpoint_scope: trio.CancelScope | None = None
        self._final_failures = 0
        self._handed_over = False

    async def restore(self) -> None:
        """Fill the empty home from the store (nothing to do for an adopted home).

        Raises what ``Persistence.restore`` raises.
        """
        if self._adopted:
            return
        if self.snapshots is not None:
            self.generation = await self.snapshots.restore(self._codex_home)
        else:
            self.generation = await self._persistence.restore(self._workspace_id, self._codex_home)
        await trio.to_thread.run_sync(relocate_codex_home, self._codex_home)

    async def checkpoint(self) -> bool:
        """Save the live home; returns ``False`` once a newer snapshot exists (stop saving).

        A checkpoint that has begun runs to its end even when the session stops meanwhile: cut
        short after the store took the archive, its new generation would be lost, and the final
        save, fenced on the old one, would take the session's own snapshot for a newer one from
        elsewhere and set the home aside. Only ``abandon`` (the drain budget) cuts it short.
        """
        scope = trio.CancelScope(shield=True)
        self._checkpoint_scope = scope
        try:
            with scope:
                await self._save(kind="checkpoint")
        finally:
            self._checkpoint_scope = None
        return not self._superseded

    async def final_save(self, *, child_ran: bool) -> FinalSave:
        """Save the stopped home, retried with back-off until it succeeds or is given up.

        A home whose child never ran and that was restored (not adopted) holds exactly what
        the store holds: nothing is uploaded.
        """
        if not child_ran and not self._adopted:
            return FinalSave.SAVED
        if not self.may_write:
            return FinalSave.UNSAVED
        saved = False
        with self._final_scope:
            delay = FIRST_RETRY_SECONDS
            while not self._superseded:
                if await self._save(kind="final"):
                    saved = True
                    break
                self._final_failures += 1
                if self._handed_over:
                    break
                metrics.UNSAVED_HOMES.inc()
                try:
                    await trio.sleep(delay)
                finally:
                    metrics.UNSAVED_HOMES.dec()
                delay = min(delay * 2, MAX_RETRY_SECONDS)
        if self._superseded:
            return FinalSave.SUPERSEDED
        return FinalSave.SAVED if saved else FinalSave.UNSAVED

    def hand_over(self) -> None:
        """A new session needs this home: give up a final save that has already failed."""
        self._handed_over = True
        if self._final_failures:
            self._final_scope.cancel()

    def abandon(self) -> None:
        """Stop the final save (and a checkpoint still running) now; the home is kept as it is."""
        self._final_scope.cancel()
        if self._checkpoint_scope is not None:
            self._checkpoint_scope.cancel()

    def unsaved(self) -> Unsaved:
        """The home as it is left when the final save did not succeed."""
        return Unsaved(codex_home=self._codex_home, generation=self.generation)

    async def _save(self, *, kind: str) -> bool:
        """Save now; returns whether it succeeded (failures are recorded and logged)."""
        async with self._lock:
            start = trio.current_time()
            previous = self.generation
            try:
                if self.snapshots is not None:
                    self.generation = await self.snapshots.save(
                        self._codex_home,
                        self.generation,
                        read_as=self.read_as,
                        recorded_home=self._recorded_home,
                    )
                else:
                    self.generation = await self._persistence.save(
                        self._workspace_id,
                        self._codex_home,
                        self.generation,
                        read_as=self.read_as,
                        recorded_home=self._recorded_home,
                    )
            except StaleSnapshot as exc:
                # Another writer (a newer session elsewhere) owns the workspace now; writing
                # again can never succeed and must not be tried.
                self._superseded = True
                self.last_error = f"superseded: {exc}"
                metrics.SAVES.labels(kind=kind, result="stale").inc()
                log.error("session.superseded", kind=kind, error=str(exc))
                return False
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                metrics.SAVES.labels(kind=kind, result="failed").inc()
                log.error("session.save_failed", kind=kind, error=self.last_error)
                return False
            uploaded = self.generation.stored != previous.stored
            metrics.SAVES.labels(kind=kind, result="ok" if uploaded else "unchanged").inc()
            if uploaded and self.generation.size:
                metrics.SAVE_BYTES.labels(kind=kind).inc(self.generation.size)
            metrics.SAVE_SECONDS.labels(kind=kind).observe(trio.current_time() - start)
            self.last_checkpoint = time.time()
            self.last_error = None
            return True
