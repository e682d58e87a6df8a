"""How the daemon builds what each session needs: the store, credentials and executors."""

from __future__ import annotations

from pathlib import Path

import httpx2

from gateway.codex_home.config_toml import McpServer
from gateway.config import Config
from gateway.credentials import SessionModelCredentials
from gateway.sessions.session import CredentialsFactory, ExecutorsFactory, ModelCredentials
from gateway.store.base import ObjectStore
from gateway.store.local import LocalDirectoryStore


def open_store(config: Config) -> ObjectStore:
    """The configured object store."""
    return LocalDirectoryStore(config.local_store_dir)


def credentials_factory(config: Config, http: httpx2.AsyncClient) -> CredentialsFactory:
    """Build each session's model-credentials keeper."""

    def make(workspace_id: str, runtime_dir: Path) -> ModelCredentials:
        return SessionModelCredentials(config, http, workspace_id, runtime_dir)

    return make


def executors_factory(
    config: Config, http: httpx2.AsyncClient, self_command: tuple[str, ...]
) -> ExecutorsFactory:
    """Build each session's ``[mcp_servers]`` entries (none without an exec gateway)."""

    async def discover(workspace_id: str) -> tuple[McpServer, ...]:
        return ()

    return discover
