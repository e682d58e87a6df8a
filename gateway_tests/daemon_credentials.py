"""Real model credentials for every session of an in-process daemon, with a handle on each.

The daemon builds each session's credentials with ``gateway.daemon.credentials_factory``; a
test that replaces it with ``install_credentials`` gets :class:`SessionModelCredentials` (the
session core's own ``prime`` / ``provider`` / ``child_env`` / ``keep_fresh`` calls are what
runs) and can wait for each one's token refreshes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx2
import pytest

import gateway.daemon
from gateway.config import Config
from gateway.credentials import SessionModelCredentials
from gateway.sessions.session import ModelCredentials


def install_credentials(
    monkeypatch: pytest.MonkeyPatch, made: list[SessionModelCredentials]
) -> None:
    """Make the daemon give every session a ``SessionModelCredentials``."""

    def factory(
        config: Config, http: httpx2.AsyncClient
    ) -> Callable[[str, Path], ModelCredentials]:
        def make(workspace_id: str, runtime_dir: Path) -> ModelCredentials:
            creds = SessionModelCredentials(config, http, workspace_id, runtime_dir)
            made.append(creds)
            return creds

        return make

    monkeypatch.setattr(gateway.daemon, "credentials_factory", factory)
