"""Where a workspace's session lives: here, or on the peer pod that owns it.

The session manager asks ``Placement.claim`` before it starts a workspace's session (once per
start, single-flight); the front door forwards a connect that ends in ``OwnedElsewhere`` to the
owner's internal listener; the owner's internal listener accepts a forwarded connect only while
``Placement.holds`` the workspace at the epoch the forwarder saw (else ``NotOwnedHere``, 409,
and the forwarder reads the owner again).

Without replica mode there is one pod: ``SolePlacement`` owns everything at epoch 0.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from gateway.sessions.outcome import SessionStartError


@attrs.frozen
class PeerOwner:
    """The pod that owns a workspace, as its ownership record names it."""

    pod: str
    # HOST:PORT of the owner's internal listener (its CXG_PEER_ADDR).
    peer_addr: str
    # Raised by every change of owner; a forwarded connect carries the epoch it was sent for.
    epoch: int


class OwnedElsewhere(SessionStartError):
    """A live peer owns the workspace: the connect is forwarded to ``owner``."""

    def __init__(self, owner: PeerOwner) -> None:
        super().__init__(f"workspace is served by pod {owner.pod}", status=503)
        self.owner = owner


class NotOwnedHere(SessionStartError):
    """A forwarded connect reached a pod that no longer owns the workspace at that epoch."""

    def __init__(self, message: str = "this pod does not own the workspace") -> None:
        super().__init__(message, status=409)


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

    def set_draining(self) -> None:
        """This pod is draining: claim nothing more, and say so in its heartbeat."""
        ...


class SolePlacement:
    """One pod, no ownership records: every workspace is served here, at epoch 0."""

    async def claim(self, workspace_id: str) -> int:
        """Always this pod."""
        return 0

    def holds(self, workspace_id: str, epoch: int) -> bool:
        """Only epoch 0 exists."""
        return epoch == 0

    def set_draining(self) -> None:
        """Nothing to tell: the session manager itself refuses new sessions while draining."""
