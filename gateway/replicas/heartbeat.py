"""This pod's heartbeat, and how it judges its peers' (replica mode).

One heartbeat object per pod (``codex-app-gateway/.pods/<pod>.json``), not a lease per
workspace: ``run_heartbeat`` rewrites it every ``heartbeat_interval`` and, in the same pass,
reads the peers' heartbeats into ``PeerLiveness``.

Liveness is judged on *this* pod's clock only. Pod P's incarnation I counts as alive while this
pod keeps seeing P's heartbeat change while it shows I; the first sighting counts as a change;
a heartbeat showing another incarnation freezes I's clock; an incarnation this pod has never
seen (a record names it, its heartbeat never showed it) starts its clock when it is first asked
about — it may be a pod started since the last look. I is dead once ``takeover_after`` has
passed, between its last seen change and this pod's latest *successful* look, without a change
— so a pod whose own reads fail never takes a peer for dead, and a peer's wall clock is never
consulted. A heartbeat that says ``stopped`` (a clean exit after the drain) is dead at once.

Self-fencing. A heartbeat write that succeeds pets the keeper (``Keeper.pet``) with what is
left of ``fence_after`` since the write started; when no write has succeeded for
``fence_after`` (measured from the start of the last successful one) this pod fences itself
(``fence``: children killed, clients closed) before any peer can judge it dead
(``fence_after`` < ``takeover_after``), and claims nothing until a write succeeds again.

One pod name, two processes. Every heartbeat write is conditional on the ETag of the previous
one: a process that finds its heartbeat rewritten by another incarnation refuses to serve
(``DuplicatePodName``), and a daemon whose pod's heartbeat is still changing at start refuses
to start (``check_pod_name_free``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import structlog
import trio

from gateway import metrics
from gateway.config import ReplicaSettings
from gateway.replicas.records import (
    PODS_PREFIX,
    Heartbeat,
    Records,
    Superseded,
    new_write_id,
    pod_of_heartbeat_key,
)
from gateway.store.base import StoreUnavailable

log = structlog.get_logger(__name__)

# More pods than this under .pods/ are not read (a bound on one pass's work).
MAX_PODS = 1000


class DuplicatePodName(Exception):
    """Another live gateway process uses this pod's name; the message says what to fix."""


class Keeper(Protocol):
    """What the heartbeat needs of the self-fencing keeper (``gateway/replicas/deadman.py``)."""

    def pet(self, seconds_left: float) -> None:
        """Nothing watched is killed for ``seconds_left`` from now."""


@attrs.define
class _PodSighting:
    incarnation: str
    etag: str
    draining: bool
    stopped: bool


class PeerLiveness:
    """The peers' heartbeats as this pod has seen them; see the module docstring.

    Pure bookkeeping: ``observe`` is fed by the heartbeat pass, times are this pod's
    ``trio.current_time()``.
    """

    def __init__(self, takeover_after: float) -> None:
        self.takeover_after = takeover_after
        self._last_look: float | None = None
        self._shown: dict[str, _PodSighting] = {}
        self._changed_at: dict[tuple[str, str], float] = {}
        self._stopped: set[tuple[str, str]] = set()

    def observe(self, pod: str, heartbeat: Heartbeat, etag: str, now: float) -> None:
        """Pod ``pod``'s heartbeat as read now (ETag ``etag``)."""
        shown = self._shown.get(pod)
        if shown is None or (shown.incarnation, shown.etag) != (heartbeat.incarnation, etag):
            self._changed_at[(pod, heartbeat.incarnation)] = now
        self._shown[pod] = _PodSighting(
            heartbeat.incarnation, etag, heartbeat.draining, heartbeat.stopped
        )
        if heartbeat.stopped:
            self._stopped.add((pod, heartbeat.incarnation))

    def unchanged(self, pod: str, etag: str) -> bool:
        """Whether ``pod``'s heartbeat still has ``etag`` (no need to read it again)."""
        shown = self._shown.get(pod)
        return shown is not None and shown.etag == etag

    def looked(self, now: float) -> None:
        """A whole pass over the peers' heartbeats succeeded at ``now``."""
        self._last_look = now

    def fresh(self, now: float, within: float) -> bool:
        """Whether the last successful pass is at most ``within`` seconds old."""
        return self._last_look is not None and now - self._last_look <= within

    def is_dead(self, pod: str, incarnation: str, now: float) -> bool:
        """Whether ``pod``'s ``incarnation`` has been silent for ``takeover_after``.

        ``now``: when it is asked, the start of the clock of an incarnation never seen.
        """
        if (pod, incarnation) in self._stopped:
            return True
        if self._last_look is None:
            return False
        changed = self._changed_at.setdefault((pod, incarnation), now)
        return self._last_look - changed >= self.takeover_after

    def is_draining(self, pod: str) -> bool:
        """Whether ``pod``'s heartbeat says it is draining."""
        shown = self._shown.get(pod)
        return shown is not None and shown.draining


@attrs.define
class HeartbeatState:
    """This pod's own heartbeat: what it last wrote and whether it is fenced."""

    settings: ReplicaSettings
    incarnation: str
    counter: int = 0
    etag: str | None = None
    draining: bool = False
    # Set when renewals failed for fence_after; claims are refused until a renewal succeeds.
    fenced: bool = False
    # trio time at which the last successful write *started*.
    renewed_at: float | None = None
    # Another process writes this pod's heartbeat: this one must not write it again.
    duplicate: bool = False

    def next_heartbeat(self, *, stopped: bool = False) -> Heartbeat:
        """The heartbeat to write next."""
        return Heartbeat(
            pod=self.settings.pod_name,
            incarnation=self.incarnation,
            peer_addr=self.settings.peer_addr,
            counter=self.counter + 1,
            draining=self.draining,
            stopped=stopped,
            write_id=new_write_id(),
        )


async def check_pod_name_free(
    records: Records, settings: ReplicaSettings, *, watch_for: float | None = None
) -> str | None:
    """Refuse to start while another process's heartbeat for this pod name still changes.

    Returns the ETag of the pod's heartbeat found (the first write of this process is
    conditional on it), or ``None`` when there is none. A heartbeat that says ``stopped`` is
    free at once; any other is watched for ``watch_for`` (default two heartbeat intervals):
    a change means a live process, and ``DuplicatePodName``.
    """
    pod = settings.pod_name
    first = await records.read_heartbeat(pod)
    if first is None:
        return None
    if first.value.stopped:
        return first.etag
    watch = 2 * settings.heartbeat_interval if watch_for is None else watch_for
    with trio.move_on_after(watch):
        while True:
            await trio.sleep(settings.heartbeat_interval / 4)
            current = await records.read_heartbeat(pod)
            etag = current.etag if current is not None else None
            if etag != first.etag:
                raise DuplicatePodName(
                    f"another gateway process is serving as pod {pod!r} (its heartbeat "
                    f"{PODS_PREFIX}{pod}.json keeps changing); give every replica its own "
                    "CXG_POD_NAME"
                )
    return first.etag


async def observe_peers(records: Records, liveness: PeerLiveness) -> None:
    """One pass: list the heartbeats, read those that changed, feed ``liveness``."""
    listed = await records.store.list_generations(PODS_PREFIX, limit=MAX_PODS)
    for key, etag in listed.items():
        pod = pod_of_heartbeat_key(key)
        if pod is None or liveness.unchanged(pod, etag):
            continue
        found = await records.read_heartbeat(pod)
        if found is not None:
            liveness.observe(pod, found.value, found.etag, trio.current_time())
    liveness.looked(trio.current_time())


async def run_heartbeat(
    records: Records,
    state: HeartbeatState,
    liveness: PeerLiveness,
    *,
    fence: Callable[[str], None],
    unfence: Callable[[], None] | None = None,
    keeper: Keeper | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write this pod's heartbeat and read the peers' every interval, until cancelled.

    Reports ``started`` after the first successful write and look (until then this pod
    claims nothing). Raises ``DuplicatePodName`` when another process writes this pod's
    heartbeat. On cancellation (the daemon's end, after its drain) a last heartbeat says
    ``stopped``, so peers take over whatever is left at once.
    """
    interval = state.settings.heartbeat_interval
    try:
        await _beat(records, state, liveness, fence, unfence, keeper, task_status)
    except BaseExceptionGroup as group:
        # One meaningful exception at this boundary: the pod-name clash is the daemon's end.
        duplicate, _ = group.split(DuplicatePodName)
        if duplicate is not None:
            leaf: BaseException = duplicate
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            raise leaf from None
        raise
    finally:
        if state.renewed_at is not None and not state.duplicate:
            with trio.CancelScope(shield=True), trio.move_on_after(interval):
                await _write_stopped(records, state)


async def _beat(
    records: Records,
    state: HeartbeatState,
    liveness: PeerLiveness,
    fence: Callable[[str], None],
    unfence: Callable[[], None] | None,
    keeper: Keeper | None,
    task_status: trio.TaskStatus[None],
) -> None:
    """The loop of ``run_heartbeat``, beside its fencing watch."""
    interval = state.settings.heartbeat_interval
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_fence_when_silent, state, fence)
        started = False
        while True:
            began = trio.current_time()
            # A write that hangs must not hold up the next one (nor the look at the
            # peers): one in doubt is settled by the next write's read-back.
            with trio.move_on_after(interval):
                await _renew(records, state, keeper, began, unfence)
            try:
                with trio.move_on_after(interval):
                    await observe_peers(records, liveness)
            except StoreUnavailable as exc:
                log.warning("replica.peers_unreadable", error=str(exc))
            ready = state.renewed_at is not None
            if not started and ready and liveness.fresh(trio.current_time(), 2 * interval):
                started = True
                task_status.started()
            await trio.sleep_until(began + interval)


async def _fence_when_silent(state: HeartbeatState, fence: Callable[[str], None]) -> None:
    """Fence this pod whenever its heartbeat has gone ``fence_after`` without a renewal."""
    fence_after = state.settings.fence_after
    while True:
        if state.renewed_at is None or state.fenced:
            await trio.sleep(state.settings.heartbeat_interval / 4)
            continue
        deadline = state.renewed_at + fence_after
        if trio.current_time() < deadline:
            await trio.sleep_until(deadline)
            continue
        state.fenced = True
        silent = trio.current_time() - state.renewed_at
        log.error("replica.fenced", silent_seconds=round(silent, 3), pod=state.settings.pod_name)
        fence(f"heartbeat not renewed for {silent:.1f}s")


async def _renew(
    records: Records,
    state: HeartbeatState,
    keeper: Keeper | None,
    began: float,
    unfence: Callable[[], None] | None = None,
) -> None:
    """Rewrite the heartbeat once; a failure is logged, a foreign writer is fatal."""
    heartbeat = state.next_heartbeat()
    try:
        etag = await records.write_heartbeat(heartbeat, expected=state.etag)
    except Superseded as exc:
        current = exc.current
        foreign = current is not None and current.value.incarnation != state.incarnation
        if foreign or current is None:
            state.duplicate = True
            metrics.REPLICA_EVENTS.labels(event="duplicate_pod_name").inc()
            raise DuplicatePodName(
                f"another gateway process rewrote the heartbeat of pod "
                f"{state.settings.pod_name!r}; this one stops serving: give every replica its "
                "own CXG_POD_NAME"
            ) from None
        # Our own incarnation, another write id: an earlier write of ours whose answer was
        # lost landed. Go on from it.
        state.etag, state.counter = current.etag, current.value.counter
        return
    except StoreUnavailable as exc:
        metrics.REPLICA_EVENTS.labels(event="heartbeat_failed").inc()
        log.warning("replica.heartbeat_failed", error=str(exc))
        return
    ended = trio.current_time()
    state.etag, state.counter, state.renewed_at = etag, heartbeat.counter, began
    if state.fenced:
        log.warning("replica.unfenced", pod=state.settings.pod_name)
        state.fenced = False
        if unfence is not None:
            # Sessions may start again (each claim reads its record anew).
            unfence()
    if keeper is not None:
        keeper.pet(state.settings.fence_after - (ended - began))


async def _write_stopped(records: Records, state: HeartbeatState) -> None:
    try:
        await records.write_heartbeat(state.next_heartbeat(stopped=True), expected=state.etag)
    except StoreUnavailable as exc:
        log.warning("replica.stopped_heartbeat_failed", error=str(exc))
    except Superseded:
        pass
