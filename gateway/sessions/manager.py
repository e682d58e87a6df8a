"""The session manager: at most one session per workspace, started single-flight.

``SessionManager.run`` is started in the daemon's nursery and owns the nursery every session
runs in, so sessions outlive the client connections that started them. ``attach`` finds or
starts a workspace's session (any number of simultaneous first connects start exactly one
child); ``restart`` and ``drain`` stop sessions; a session whose child keeps crashing is held
back with growing delays.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from gateway import metrics
from gateway.replicas.placement import NotOwnedHere, OwnedElsewhere
from gateway.sessions.directories import SessionDirectories
from gateway.sessions.outcome import (
    Outcome,
    Saved,
    SaveResult,
    SessionStartError,
    StopReason,
    Unsaved,
)
from gateway.sessions.process_tree import end_leftover_processes
from gateway.sessions.session import IDLE_CHECK_SECONDS, Session, SessionServices
from gateway.sessions.turns import child_is_busy

log = structlog.get_logger(__name__)

# A session that lived this long without crashing resets its workspace's crash count.
CRASH_FORGET_SECONDS = 300.0
CRASH_BACKOFF_MAX_SECONDS = 60.0
# Replica drain: how often a busy session's child is asked whether its turn has ended.
DRAIN_TURN_POLL_SECONDS = 1.0
# Replica drain: after CXG_DRAIN_BUDGET, the sessions stopped then get their child's stop grace
# and this long for the final save before it is abandoned (the chart's grace period adds both).
DRAIN_FINAL_SAVE_SECONDS = 10.0


class Unavailable(SessionStartError):
    """No session can be started now (draining, full, backing off); HTTP 503."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message, status=503)
        self.retry_after = retry_after


@attrs.define
class _CrashRecord:
    count: int = 0
    last: float = -math.inf


def crash_backoff(consecutive_crashes: int) -> float:
    """Seconds to hold back a restart: none after one crash, then 2 s, 4 s, … up to 60 s."""
    if consecutive_crashes <= 1:
        return 0.0
    # The exponent is capped first: 2.0 ** 1024 overflows, and 2 ** 32 s is far past the cap.
    return min(2.0 ** min(consecutive_crashes - 1, 32), CRASH_BACKOFF_MAX_SECONDS)


@attrs.define(eq=False)
class _Entry:
    """A workspace's session in the table, and its start, shared by every connect waiting on it.

    ``started`` is the value ``Session.run`` reported through ``nursery.start``: the session
    once ready, or the ``SessionStartError`` every waiting connect gets.
    """

    session: Session
    started_event: trio.Event = attrs.field(factory=trio.Event)
    started: Session | SessionStartError | None = None
    # Set once the manager has taken the session's outcome into account (table, crash count).
    settled: trio.Event = attrs.field(factory=trio.Event)


class SessionManager:
    """Owns every session; see the module docstring."""

    def __init__(self, services: SessionServices) -> None:
        self._services = services
        self._config = services.config
        self._tmp_root = Path(self._config.tmp_root)
        self._sessions: dict[str, _Entry] = {}
        self._crashes: dict[str, _CrashRecord] = {}
        self._nursery: trio.Nursery | None = None
        self.draining = False
        #: Why this pod is fenced (``fence_all``); ``None`` while it may start sessions.
        self.fenced: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[SessionManager]) -> None:
        """Own the sessions' nursery until cancelled (after ``drain``)."""
        self._tmp_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Before any leftover directory is adopted or set aside, nothing may still run in it.
        for leftover in await trio.to_thread.run_sync(end_leftover_processes, self._tmp_root):
            log.warning(
                "session.leftover_process_ended",
                pid=leftover.pid,
                name=leftover.name,
                matched=leftover.reason,
                path=leftover.path,
            )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    # -- attaching --------------------------------------------------------------------------

    async def attach(self, workspace_id: str, *, epoch: int | None = None) -> Session:
        """Return the workspace's running session, starting it if needed.

        ``epoch``: a connect forwarded by a peer pod for that ownership epoch; it is served only
        while this pod holds the workspace at exactly that epoch (else ``NotOwnedHere``), and
        never makes this pod claim the workspace.
        """
        placement = self._services.placement
        if epoch is not None and not placement.holds(workspace_id, epoch):
            raise NotOwnedHere()
        while True:
            entry = self._sessions.get(workspace_id)
            if entry is None and epoch is None and self._full() and self._may_start():
                # A full pod still forwards a connect for another pod's workspace.
                owner = await placement.peer_owner(workspace_id)
                if owner is not None:
                    raise OwnedElsewhere(owner)
                entry = self._sessions.get(workspace_id)  # another connect may have started it
            if entry is None:
                entry = self._start(workspace_id, adopt=None)
            elif entry.session.stopping:
                # Never two children on one home: wait for the old one's outcome; it gives up a
                # final save that already failed, and its unsaved home is then adopted.
                log.info("session.waiting_for_previous", workspace_id=workspace_id)
                entry.session.hand_over()
                outcome = await entry.session.ended()
                if self._sessions.get(workspace_id) is not entry:
                    continue
                del self._sessions[workspace_id]
                adopt = outcome.save if isinstance(outcome.save, Unsaved) else None
                entry = self._start(workspace_id, adopt=adopt)
            if not entry.started_event.is_set():
                await entry.started_event.wait()
            started = entry.started
            if isinstance(started, SessionStartError):
                # A refused connect leaves nothing behind: the failed session ends first (a
                # restored home is deleted; an adopted one is saved, or kept after one failure).
                entry.session.hand_over()
                await entry.settled.wait()
                raise started
            if started is not None and not started.stopping:
                if epoch is not None and started.epoch != epoch:
                    raise NotOwnedHere()
                return started

    def _start(self, workspace_id: str, adopt: Unsaved | None) -> _Entry:
        if self.draining or self._nursery is None:
            raise Unavailable("gateway is shutting down; reconnect to another instance")
        if self.fenced is not None:
            raise Unavailable(
                "this gateway pod lost contact with the store and starts no session until it "
                "is back; reconnect in a moment",
                retry_after=5,
            )
        if self._full():
            raise Unavailable(
                f"gateway is full ({self._config.max_sessions} sessions, CXG_MAX_SESSIONS)",
                retry_after=30,
            )
        record = self._crashes.get(workspace_id)
        if record is not None:
            wait = record.last + crash_backoff(record.count) - trio.current_time()
            if wait > 0:
                raise Unavailable(
                    f"codex for this workspace exited {record.count} times in a row; "
                    f"retrying in {math.ceil(wait)}s",
                    retry_after=math.ceil(wait),
                )
        directories = SessionDirectories.for_workspace(self._tmp_root, workspace_id)
        if adopt is None:
            _set_aside_leftover(directories)
        else:
            log.warning("session.adopting_unsaved_home", workspace_id=workspace_id)
        entry = _Entry(Session(workspace_id, self._services, directories, adopted=adopt))
        self._sessions[workspace_id] = entry
        self._nursery.start_soon(self._run_session, entry, name=f"session:{workspace_id}")
        return entry

    def _may_start(self) -> bool:
        """Whether this pod starts sessions at all now (not draining, not fenced)."""
        return not self.draining and self._nursery is not None and self.fenced is None

    def _full(self) -> bool:
        """Whether ``CXG_MAX_SESSIONS`` live sessions exist (a stopping one no longer counts)."""
        limit = self._config.max_sessions
        if not limit:
            return False
        return sum(1 for e in self._sessions.values() if not e.session.stopping) >= limit

    async def _run_session(self, entry: _Entry) -> None:
        session = entry.session
        began = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                entry.started = await nursery.start(session.run)
                entry.started_event.set()
        except Exception:
            # Escaping here would take every other session down with it.
            log.exception("session.crashed", workspace_id=session.workspace_id)
        finally:
            if entry.started is None:
                entry.started = SessionStartError("session failed to start")
            entry.started_event.set()
            outcome = session.outcome
            if outcome is not None:
                refused = (
                    isinstance(entry.started, SessionStartError) and entry.started.status == 500
                )
                self._note_end(
                    session.workspace_id, outcome, trio.current_time() - began, refused=refused
                )
            # An unsaved home stays in the table until a new session adopts it.
            leaves = outcome is not None and not isinstance(outcome.save, Unsaved)
            if self._sessions.get(session.workspace_id) is entry and leaves:
                del self._sessions[session.workspace_id]
            entry.settled.set()

    def _note_end(
        self, workspace_id: str, outcome: Outcome, lifetime: float, *, refused: bool
    ) -> None:
        # A refused archive (500) is not a crash: each connect gets the refusal itself, which
        # names the object to look at, at no cost (the refusal is remembered by generation).
        if outcome.reason in (StopReason.CHILD_EXITED, StopReason.START_FAILED) and not refused:
            record = self._crashes.setdefault(workspace_id, _CrashRecord())
            if lifetime > CRASH_FORGET_SECONDS:
                record.count = 0
            record.count += 1
            record.last = trio.current_time()
        else:
            self._crashes.pop(workspace_id, None)

    # -- stopping ---------------------------------------------------------------------------

    async def restart(self, workspace_id: str) -> SaveResult | None:
        """Stop (and save) the workspace's session; returns what became of its home.

        ``Saved()`` also when there was no session; ``None`` when it did not end in time.
        """
        entry = self._sessions.get(workspace_id)
        if entry is None:
            return Saved()
        entry.session.stop(StopReason.RESTART)
        with trio.move_on_after(self._config.child_stop_grace + self._config.drain_budget):
            return (await entry.session.ended()).save
        return None

    async def drain(self) -> None:
        """Stop every session with 1001, saving each, within ``CXG_DRAIN_BUDGET``.

        In replica mode a running turn is not cut short: see ``_drain_replica``.
        """
        if self._config.replicas is not None:
            await self._drain_replica()
            return
        self.draining = True
        sessions = [entry.session for entry in self._sessions.values()]
        log.info("drain.started", sessions=len(sessions), budget_seconds=self._config.drain_budget)
        for session in sessions:
            session.stop(StopReason.DRAIN)
        with trio.move_on_after(self._config.drain_budget) as scope:
            for session in sessions:
                await session.ended()
        saved = [s for s in sessions if s.outcome is not None and s.outcome.save == Saved()]
        if scope.cancelled_caught:
            unsaved = [s.workspace_id for s in sessions if s not in saved]
            log.error("drain.budget_exhausted", unsaved_workspaces=unsaved)
            for session in sessions:
                session.abandon_final_save()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        log.info("drain.finished", saved=len(saved), total=len(sessions))

    async def _drain_replica(self) -> None:
        """Leave the workspaces to the other pods without cutting a turn short.

        The pod says it is draining (``Placement.set_draining``: no more claims, and its
        heartbeat shows it) and starts no session. An idle session (no turn running) is
        stopped and saved at once; a busy one when its turn has ended, or at
        ``CXG_DRAIN_BUDGET``, whichever comes first. Each stop saves (and, with ownership
        records, releases the workspace, so the next connect anywhere takes it over at once).
        The last stops get the child's stop grace and ``DRAIN_FINAL_SAVE_SECONDS`` more; a
        final save still running then is abandoned, its home kept on disk.
        """
        self.draining = True
        self._services.placement.set_draining()
        sessions = [entry.session for entry in self._sessions.values()]
        budget = self._config.drain_budget
        log.info("drain.started", sessions=len(sessions), budget_seconds=budget, mode="replicas")
        turns_end_by = trio.current_time() + budget
        saves_end_by = turns_end_by + self._config.child_stop_grace + DRAIN_FINAL_SAVE_SECONDS
        with trio.move_on_at(saves_end_by) as scope:
            async with trio.open_nursery() as nursery:
                for session in sessions:
                    nursery.start_soon(_drain_session, session, turns_end_by)
        saved = [s for s in sessions if s.outcome is not None and s.outcome.save == Saved()]
        if scope.cancelled_caught:
            unsaved = [s.workspace_id for s in sessions if s not in saved]
            log.error("drain.budget_exhausted", unsaved_workspaces=unsaved)
            for session in sessions:
                session.abandon_final_save()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        log.info("drain.finished", saved=len(saved), total=len(sessions))

    def fence_all(self, reason: str) -> None:
        """Stop every session now, unsaved, and start none until ``lift_fence``.

        Replica mode calls this when this pod can no longer be sure it owns its workspaces (its
        heartbeat has not been renewed for ``fence_after``, or its keeper fired): a peer may
        take them over soon, so nothing here may keep running or write to the store. Children
        are SIGKILLed, clients closed with 1012, and each home is set aside under
        ``.orphaned`` (``Fenced``), as is every unsaved home kept for adoption.
        """
        self.fenced = reason
        metrics.REPLICA_EVENTS.labels(event="fenced").inc()
        log.error("fence.sessions_stopped", reason=reason, sessions=len(self._sessions))
        for workspace_id, entry in list(self._sessions.items()):
            outcome = entry.session.outcome
            if outcome is None:
                entry.session.fence()
            elif isinstance(outcome.save, Unsaved):
                # Kept for a later session here to adopt: the workspace may move elsewhere now.
                del self._sessions[workspace_id]
                _set_aside_leftover(entry.session.directories)

    def lift_fence(self) -> None:
        """This pod's hold on the store is confirmed again: sessions may start."""
        if self.fenced is not None:
            log.info("fence.lifted", reason=self.fenced)
        self.fenced = None

    # -- introspection ----------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """The admin listing."""
        return [entry.session.describe() for entry in self._sessions.values()]


async def _drain_session(session: Session, turns_end_by: float) -> None:
    """Stop ``session`` once no turn runs in it (or at ``turns_end_by``), and wait for its end."""
    waited = False
    with trio.move_on_at(turns_end_by):
        while not session.stopping and session.child is not None:
            if not await child_is_busy(session.child, within=IDLE_CHECK_SECONDS):
                break
            if not waited:
                log.info("drain.waiting_for_turn", workspace_id=session.workspace_id)
                waited = True
            # The child is asked again; the relay stays a byte pipe (gateway/sessions/turns.py).
            await trio.sleep(DRAIN_TURN_POLL_SECONDS)
    session.stop(StopReason.DRAIN)
    await session.ended()


def _set_aside_leftover(directories: SessionDirectories) -> None:
    """Keep, never delete, a directory left by a previous process that died without saving.

    It may hold history newer than the store's last checkpoint, but it cannot be trusted to be
    consistent or newer, so it is moved aside for an operator (docs/operations.md).
    """
    if not directories.root.exists():
        return
    aside = directories.set_aside()
    log.warning("session.leftover_directory_set_aside", path=str(aside))
