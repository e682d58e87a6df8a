"""The store-backed ``Placement`` of replica mode: claim, takeover, commit, release.

Every decision is a conditional write on the workspace's ownership record
(``gateway/replicas/records.py``):

* **claim**: no record → create it (``If-None-Match: *``), epoch 1. A record of this very
  process → it is held already. A record that is ``released``, or whose owner's incarnation
  this pod judges dead (``PeerLiveness``: silent for ``CXG_OWNER_TAKEOVER_AFTER`` on this pod's
  clock) → take it over (``If-Match``), epoch + 1. Otherwise ``OwnedElsewhere`` names the
  live owner. A lost race re-reads, a bounded number of times.
* **commit**: a snapshot counts once the record, ``If-Match`` the ETag this pod holds, names
  it. A 412 means another pod took the workspace: this pod's hold ends and the session is
  superseded; it never writes again.
* **release**: after a successful final save the record says ``released``, so the next
  connect anywhere takes the workspace at once.

Writes whose answer was lost are settled by reading the record back (its ``write_id``); one
that stays in doubt is remembered and recognised by the next read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import structlog
import trio

from gateway import metrics
from gateway.codex_home.persistence import Persistence
from gateway.config import ReplicaSettings
from gateway.replicas.heartbeat import HeartbeatState, PeerLiveness
from gateway.replicas.placement import OwnedElsewhere, PeerOwner
from gateway.replicas.records import (
    OWNERS_PREFIX,
    NoLongerOwner,
    OwnershipRecord,
    OwnerState,
    Records,
    Superseded,
    Versioned,
    new_write_id,
)
from gateway.replicas.snapshots import CommittedSnapshots
from gateway.sessions.outcome import SessionStartError
from gateway.store.base import ReplicaStore, StoreUnavailable

log = structlog.get_logger(__name__)

# Lost races in one claim before it answers 503 (each lost race means another pod moved).
MAX_CLAIM_ROUNDS = 4
# The admin listing reads at most this many ownership records.
MAX_LISTED_OWNERS = 200


@attrs.define
class Hold:
    """A workspace this process owns: the record as last written, and its ETag."""

    record: OwnershipRecord
    etag: str
    # Write ids of record writes whose outcome is still unknown (recognised on the next read).
    pending: set[str] = attrs.field(factory=set)

    @property
    def epoch(self) -> int:
        """The epoch this pod holds the workspace at."""
        return self.record.epoch


class StorePlacement:
    """Replica mode's ``Placement``; see the module docstring."""

    def __init__(
        self,
        settings: ReplicaSettings,
        store: ReplicaStore,
        liveness: PeerLiveness,
        heartbeat: HeartbeatState,
    ) -> None:
        self.settings = settings
        self.store = store
        self.records = Records(store)
        self.liveness = liveness
        self.heartbeat = heartbeat
        self._held: dict[str, Hold] = {}

    @property
    def incarnation(self) -> str:
        """This daemon process's incarnation."""
        return self.heartbeat.incarnation

    # -- Placement ----------------------------------------------------------------------------

    async def claim(self, workspace_id: str) -> int:
        """Make this pod the workspace's owner (or find the live owner); see the module doc."""
        self._check_can_claim()
        try:
            for _ in range(MAX_CLAIM_ROUNDS):
                epoch = await self._claim_once(workspace_id)
                if epoch is not None:
                    return epoch
        except StoreUnavailable as exc:
            raise SessionStartError(
                f"cannot decide which pod serves this workspace: the store failed ({exc})"
            ) from exc
        raise SessionStartError("the workspace's owner keeps changing; reconnect in a moment")

    def holds(self, workspace_id: str, epoch: int) -> bool:
        """Whether this process holds the workspace at ``epoch`` and may serve it."""
        hold = self._held.get(workspace_id)
        return hold is not None and hold.epoch == epoch and not self.heartbeat.fenced

    async def release(self, workspace_id: str, epoch: int) -> None:
        """Mark the record ``released`` (after a successful final save); never raises."""
        hold = self._held.get(workspace_id)
        if hold is None or hold.epoch != epoch:
            return
        try:
            await self._write(
                workspace_id, hold, lambda held: attrs.evolve(held, state=OwnerState.RELEASED)
            )
        except NoLongerOwner:
            metrics.OWNER_RELEASES.labels(result="superseded").inc()
        except StoreUnavailable as exc:
            metrics.OWNER_RELEASES.labels(result="failed").inc()
            log.warning("owner.release_failed", workspace_id=workspace_id, error=str(exc))
        else:
            metrics.OWNER_RELEASES.labels(result="ok").inc()
            log.info("owner.released", workspace_id=workspace_id, epoch=epoch)
        self._held.pop(workspace_id, None)

    def owner_gone(self, owner: PeerOwner) -> bool:
        """Whether ``owner``'s process has been silent for the takeover time since."""
        return self.liveness.is_dead(owner.pod, owner.incarnation, trio.current_time())

    async def peer_owner(self, workspace_id: str) -> PeerOwner | None:
        """The live peer holding the workspace's record, if one does (one read, no write)."""
        try:
            found = await self.records.read_owner(workspace_id)
        except StoreUnavailable as exc:
            raise SessionStartError(
                f"cannot decide which pod serves this workspace: the store failed ({exc})"
            ) from exc
        if found is None or self._mine(found.value) or found.value.state is not OwnerState.OWNED:
            return None
        current = found.value
        owner = PeerOwner(current.pod, current.peer_addr, current.epoch, current.incarnation)
        return None if self.owner_gone(owner) else owner

    def set_draining(self) -> None:
        """Refuse claims from now on; the next heartbeat says ``draining``."""
        self.heartbeat.draining = True

    def snapshots(
        self, workspace_id: str, epoch: int, persistence: Persistence
    ) -> CommittedSnapshots:
        """Commit-fenced restore and saves for the session holding ``epoch``."""
        return CommittedSnapshots(self, workspace_id, epoch, persistence)

    async def describe_owners(self) -> dict[str, Any]:
        """This pod, and the owner of every workspace with a record (bounded)."""
        owners: list[dict[str, Any]] = []
        listed: dict[str, str] = {}
        try:
            listed = await self.store.list_generations(OWNERS_PREFIX, limit=MAX_LISTED_OWNERS)
        except StoreUnavailable as exc:
            log.warning("owner.listing_failed", error=str(exc))
        limiter = trio.CapacityLimiter(8)

        async def read(key: str) -> None:
            workspace_id = key[len(OWNERS_PREFIX) :].removesuffix(".json")
            async with limiter:
                try:
                    found = await self.records.read_owner(workspace_id)
                except StoreUnavailable:
                    return
            if found is not None:
                record = found.value
                owners.append(
                    {
                        "workspaceId": workspace_id,
                        "ownerPod": record.pod,
                        "epoch": record.epoch,
                        "state": record.state.value,
                        "ownerAlive": record.state is OwnerState.OWNED
                        and not self.liveness.is_dead(
                            record.pod, record.incarnation, trio.current_time()
                        ),
                    }
                )

        async with trio.open_nursery() as nursery:
            for key in listed:
                nursery.start_soon(read, key)
        owners.sort(key=lambda owner: owner["workspaceId"])
        return {
            "pod": self.settings.pod_name,
            "draining": self.heartbeat.draining,
            "fenced": self.heartbeat.fenced,
            "owners": owners,
            "ownersTruncated": len(listed) >= MAX_LISTED_OWNERS,
        }

    def owner_epoch(self, workspace_id: str) -> int | None:
        """The epoch this process holds ``workspace_id`` at, if it does."""
        hold = self._held.get(workspace_id)
        return hold.epoch if hold is not None else None

    # -- commits (called by CommittedSnapshots) ------------------------------------------------

    def hold(self, workspace_id: str, epoch: int) -> Hold:
        """This process's hold at ``epoch``; ``NoLongerOwner`` when it has none."""
        hold = self._held.get(workspace_id)
        if hold is None or hold.epoch != epoch:
            raise NoLongerOwner(f"this pod no longer owns workspace {workspace_id}", None)
        return hold

    async def commit(
        self, workspace_id: str, epoch: int, snapshot: str, legacy_seen: str | None
    ) -> None:
        """Name ``snapshot`` as the workspace's committed one, fenced on the held ETag.

        Raises ``NoLongerOwner`` (another pod owns it: refused) or ``StoreUnavailable``.
        """
        hold = self.hold(workspace_id, epoch)
        try:
            await self._write(
                workspace_id,
                hold,
                lambda held: attrs.evolve(held, committed=snapshot, legacy_seen=legacy_seen),
            )
        except NoLongerOwner:
            metrics.OWNER_COMMITS.labels(result="superseded").inc()
            raise
        except StoreUnavailable:
            metrics.OWNER_COMMITS.labels(result="failed").inc()
            raise
        metrics.OWNER_COMMITS.labels(result="ok").inc()

    async def _write(
        self,
        workspace_id: str,
        hold: Hold,
        change: Callable[[OwnershipRecord], OwnershipRecord],
    ) -> None:
        """Write ``change(held record)`` over the held one; settle writes in doubt on a 412."""
        for _ in range(2):
            record = attrs.evolve(change(hold.record), write_id=new_write_id())
            try:
                etag = await self.records.write_owner(workspace_id, record, expected=hold.etag)
            except Superseded as exc:
                current = exc.current
                if current is not None and current.value.write_id in hold.pending:
                    # An earlier write of ours did land: go on from it.
                    hold.record, hold.etag = current.value, current.etag
                    hold.pending.clear()
                    continue
                self._lose(workspace_id, hold, current)
                raise NoLongerOwner(str(exc), current) from None
            except StoreUnavailable:
                hold.pending.add(record.write_id)
                raise
            hold.record, hold.etag = record, etag
            hold.pending.clear()
            return
        raise StoreUnavailable(f"the ownership record of {workspace_id} could not be settled")

    def _lose(
        self, workspace_id: str, hold: Hold, current: Versioned[OwnershipRecord] | None
    ) -> None:
        if self._held.get(workspace_id) is hold:
            del self._held[workspace_id]
        owner = current.value.pod if current is not None else None
        log.error("owner.superseded", workspace_id=workspace_id, epoch=hold.epoch, new_owner=owner)

    # -- claiming -----------------------------------------------------------------------------

    def _check_can_claim(self) -> None:
        heartbeat = self.heartbeat
        if heartbeat.draining:
            raise SessionStartError("this gateway pod is draining; reconnect in a moment")
        if heartbeat.fenced or heartbeat.duplicate or heartbeat.renewed_at is None:
            raise SessionStartError(
                "this gateway pod cannot renew its heartbeat in the object store; reconnect "
                "in a moment"
            )
        # A stale view of the peers is safe (it can only make a dead owner look alive for
        # longer); no view at all is not.
        if not self.liveness.fresh(trio.current_time(), within=math.inf):
            raise SessionStartError(
                "this gateway pod has not read its peers' heartbeats from the object store "
                "yet; reconnect in a moment"
            )

    def _mine(self, record: OwnershipRecord) -> bool:
        return (
            record.pod == self.settings.pod_name
            and record.incarnation == self.incarnation
            and record.state is OwnerState.OWNED
        )

    async def _claim_once(self, workspace_id: str) -> int | None:
        """One read and at most one write; the epoch held, or ``None`` after a lost race."""
        found = await self.records.read_owner(workspace_id)
        held = self._held.get(workspace_id)
        if found is not None and held is not None and found.value.write_id in held.pending:
            held.record, held.etag = found.value, found.etag
            held.pending.clear()
        if found is not None and self._mine(found.value):
            hold = self._held.get(workspace_id)
            if hold is None or hold.etag != found.etag:
                hold = Hold(found.value, found.etag)
                self._held[workspace_id] = hold
            return hold.epoch
        if found is None:
            kind, epoch, base = "new", 1, None
        else:
            current = found.value
            if current.state is OwnerState.RELEASED:
                kind = "released"
            elif self.liveness.is_dead(current.pod, current.incarnation, trio.current_time()):
                kind = "takeover"
            else:
                raise OwnedElsewhere(
                    PeerOwner(current.pod, current.peer_addr, current.epoch, current.incarnation)
                )
            epoch, base = current.epoch + 1, current
        record = OwnershipRecord(
            pod=self.settings.pod_name,
            peer_addr=self.settings.peer_addr,
            incarnation=self.incarnation,
            epoch=epoch,
            state=OwnerState.OWNED,
            committed=base.committed if base is not None else None,
            legacy_seen=base.legacy_seen if base is not None else None,
            write_id=new_write_id(),
        )
        expected = found.etag if found is not None else None
        try:
            etag = await self.records.write_owner(workspace_id, record, expected=expected)
        except Superseded:
            return None
        self._held[workspace_id] = Hold(record, etag)
        metrics.OWNER_ACQUISITIONS.labels(kind=kind).inc()
        log.info(
            "owner.acquired",
            workspace_id=workspace_id,
            how=kind,
            epoch=epoch,
            previous_pod=base.pod if base is not None else None,
        )
        return epoch
