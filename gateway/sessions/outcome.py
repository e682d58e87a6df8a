"""Why a session stopped and what became of its home: the types its life ends with."""

from __future__ import annotations

import enum


class StopReason(enum.Enum):
    """Why a session ended, and what its clients are told (close code, reason)."""

    IDLE = (1001, "session idle")
    RESTART = (1012, "session restarted by request")
    DRAIN = (1001, "gateway shutting down")
    CHILD_EXITED = (1011, "codex app-server exited")
    START_FAILED = (1011, "session failed to start")
    SUPERSEDED = (1012, "a newer snapshot of this workspace exists elsewhere")

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
