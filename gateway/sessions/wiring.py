"""How the daemon builds what each session needs: the store, credentials and executors."""

from __future__ import annotations

from pathlib import Path

import httpx2

from gateway.codex_home.persistence import Persistence, open_object_store
from gateway.config import Config
from gateway.credentials import SessionModelCredentials
from gateway.executor_directory import ExecutorSetup, executor_setup
from gateway.sessions.session import CredentialsFactory, ExecutorsFactory, ModelCredentials

# codex's log database can grow to hundreds of MB and changes on every turn; it is not history.
ARCHIVE_EXCLUDES = ("logs_*.sqlite",)


def open_persistence(config: Config) -> Persistence:
    """The configured object store behind the CODEX_HOME persistence facade."""
    return Persistence(open_object_store(config), config.restore_limits, exclude=ARCHIVE_EXCLUDES)


def credentials_factory(config: Config, http: httpx2.AsyncClient) -> CredentialsFactory:
    """Build each session's model-credentials keeper."""

    def make(workspace_id: str, runtime_dir: Path) -> ModelCredentials:
        return SessionModelCredentials(config, http, workspace_id, runtime_dir)

    return make


def executors_factory(
    config: Config, http: httpx2.AsyncClient, self_command: tuple[str, ...]
) -> ExecutorsFactory:
    """Build each session's executors: its ``[mcp_servers]`` entries and, multiplexed, the
    directory its executor channel serves (nothing without an exec gateway)."""

    async def discover(workspace_id: str, channel_path: Path) -> ExecutorSetup:
        return await executor_setup(
            config.exec_gateway, http, workspace_id, self_command, channel_path
        )

    return discover
