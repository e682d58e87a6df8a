"""Why a session stopped and what became of its home: the types its life ends with."""

from __future__ import annotations

import enum
from pathlib import Path

import attrs

from gateway.codex_home.persistence import Generation


class StopReason(enum.Enum):
    """Why a session ended, and what its clients are told (close code, reason)."""

    IDLE = (1001, "session idle")
    RESTART = (1012, "session restarted by request")
    DRAIN = (1001, "gateway shutting down")
    CHILD_EXITED = (1011, "codex app-server exited")
    START_FAILED = (1011, "session failed to start")
    SUPERSEDED = (1012, "a newer snapshot of this workspace exists elsewhere")
    # Replica mode: another pod owns the workspace; the connect is forwarded there.
    OWNED_ELSEWHERE = (1012, "workspace is served by another pod")
    # Replica mode: this pod lost its hold on the store; every session stopped, unsaved.
    FENCED = (1012, "this gateway pod lost contact with the store; reconnect")

    @property
    def close_code(self) -> int:
        """The WebSocket close code attached clients receive."""
        return self.value[0]

    @property
    def close_reason(self) -> str:
        """The close reason attached clients receive."""
        return self.value[1]


class SessionState(enum.Enum):
    """Where a session is in its life (shown by ``GET /admin/sessions``)."""

    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    SAVING = "saving"
    STOPPED = "stopped"


class SessionStartError(Exception):
    """The session could not start; ``status`` is the HTTP status the connect gets."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Saved:
    """The store holds the home as the session left it; the local directory is deleted."""


@attrs.frozen
class Superseded:
    """A newer snapshot exists elsewhere; this home was set aside at ``kept_at``, unsaved."""

    kept_at: Path


@attrs.frozen
class Fenced:
    """The session was fenced (``SessionManager.fence_all``): no final save was attempted,
    because this pod may no longer own the workspace; the home was set aside at ``kept_at``
    (``None``: the session had no home on disk yet)."""

    kept_at: Path | None


@attrs.frozen
class Unsaved:
    """The final save did not succeed; the home stays at ``codex_home``, written over
    ``generation``. The workspace's next session adopts it instead of restoring."""

    codex_home: Path
    generation: Generation


SaveResult = Saved | Superseded | Fenced | Unsaved


@attrs.frozen
class Outcome:
    """How a session ended: why it stopped, and what became of its home."""

    reason: StopReason
    save: SaveResult
