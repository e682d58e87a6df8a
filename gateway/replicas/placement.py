"""Where a workspace's session lives: here, or on the peer pod that owns it.

The session manager asks ``Placement.claim`` before it starts a workspace's session (once per
start, single-flight); the front door forwards a connect that ends in ``OwnedElsewhere`` to the
owner's internal listener; the owner's internal listener accepts a forwarded connect only while
``Placement.holds`` the workspace at the epoch the forwarder saw (else ``NotOwnedHere``, 409,
and the forwarder reads the owner again).

Without replica mode there is one pod: ``SolePlacement`` owns everything at epoch 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import attrs

from gateway.codex_home.persistence import Generation, Persistence, ReadAs
from gateway.sessions.outcome import SessionStartError


@attrs.frozen
class PeerOwner:
    """The pod that owns a workspace, as its ownership record names it."""

    pod: str
    # HOST:PORT of the owner's internal listener (its CXG_PEER_ADDR).
    peer_addr: str
    # Raised by every change of owner; a forwarded connect carries the epoch it was sent for.
    epoch: int
    # The owner's process (its heartbeat's incarnation): what liveness is judged by.
    incarnation: str = ""


class OwnedElsewhere(SessionStartError):
    """A live peer owns the workspace: the connect is forwarded to ``owner``."""

    def __init__(self, owner: PeerOwner) -> None:
        super().__init__(f"workspace is served by pod {owner.pod}", status=503)
        self.owner = owner


class NotOwnedHere(SessionStartError):
    """A forwarded connect reached a pod that no longer owns the workspace at that epoch."""

    def __init__(self, message: str = "this pod does not own the workspace") -> None:
        super().__init__(message, status=409)


class Snapshots(Protocol):
    """How one session's restore and saves go through the store in replica mode.

    A save counts only once the ownership record names it (the commit); one that cannot be
    committed because another pod owns the workspace raises ``StaleSnapshot``.
    """

    async def restore(self, codex_home: Path) -> Generation:
        """Fill the empty ``codex_home`` from the workspace's committed snapshot."""
        ...

    async def save(
        self,
        codex_home: Path,
        expected: Generation,
        *,
        read_as: ReadAs | None,
        recorded_home: Path | None,
    ) -> Generation:
        """Snapshot ``codex_home`` and commit it; ``expected`` itself when nothing changed."""
        ...


class ChildWatch(Protocol):
    """The self-fencing keeper's view of a session's child (``gateway/replicas/deadman.py``).

    In replica mode a separate keeper process kills every watched process group (and uid)
    when this daemon stops renewing its heartbeat, even while the daemon itself is frozen.
    """

    def watch(self, key: str, *, pgid: int, uid: int | None) -> None:
        """Kill ``pgid`` (and every process of ``uid``) if the keeper's deadline passes."""

    def unwatch(self, key: str) -> None:
        """``key``'s child has stopped: forget it."""


class Unwatched:
    """No keeper (a single pod): children are stopped by their sessions alone."""

    def watch(self, key: str, *, pgid: int, uid: int | None) -> None:
        """Nothing to do."""

    def unwatch(self, key: str) -> None:
        """Nothing to do."""


class Placement(Protocol):
    """Decides which pod serves a workspace."""

    async def claim(self, workspace_id: str) -> int:
        """Make or confirm this pod the workspace's owner and return the epoch it holds.

        Raises ``OwnedElsewhere`` when a live peer owns it, and ``SessionStartError`` (503)
        when ownership cannot be decided now (store unreachable, this pod draining or fenced).
        """
        ...

    def holds(self, workspace_id: str, epoch: int) -> bool:
        """Whether this pod owns ``workspace_id`` at exactly ``epoch`` right now."""
        ...

    async def release(self, workspace_id: str, epoch: int) -> None:
        """Let the workspace go after a successful final save: the next claim takes it at once.

        Never raises for a store failure (the workspace then waits for the takeover time).
        """
        ...

    def set_draining(self) -> None:
        """This pod is draining: claims answer 503 from now on, the heartbeat says so."""
        ...

    def owner_gone(self, owner: PeerOwner) -> bool:
        """Whether ``owner`` has since been judged dead (a forward waiting on it gives up)."""
        ...

    async def peer_owner(self, workspace_id: str) -> PeerOwner | None:
        """The live peer that owns ``workspace_id``, if one does; claims nothing.

        Asked when this pod is full: a connect for another pod's workspace is forwarded
        rather than refused. Raises ``SessionStartError`` (503) when the store cannot say.
        """
        ...

    def snapshots(
        self, workspace_id: str, epoch: int, persistence: Persistence
    ) -> Snapshots | None:
        """How the session at ``epoch`` restores and saves; ``None``: the archive key as is."""
        ...

    async def describe_owners(self) -> dict[str, Any]:
        """For the admin listing: this pod's name and the owner of each workspace."""
        ...


class SolePlacement:
    """One pod, no ownership records: every workspace is served here, at epoch 0."""

    async def claim(self, workspace_id: str) -> int:
        """Always this pod."""
        return 0

    def holds(self, workspace_id: str, epoch: int) -> bool:
        """Only epoch 0 exists."""
        return epoch == 0

    async def release(self, workspace_id: str, epoch: int) -> None:
        """Nothing to let go."""

    def set_draining(self) -> None:
        """The manager refuses new sessions itself."""

    def owner_gone(self, owner: PeerOwner) -> bool:
        """There are no other owners."""
        return False

    async def peer_owner(self, workspace_id: str) -> PeerOwner | None:
        """There are no other owners."""
        return None

    def snapshots(self, workspace_id: str, epoch: int, persistence: Persistence) -> None:
        """Saves are fenced on the archive's own generation (``Persistence``)."""
        return None

    async def describe_owners(self) -> dict[str, Any]:
        """Nothing beyond the sessions themselves."""
        return {}
