"""How the daemon builds what each session needs: the store, credentials and executors."""

from __future__ import annotations

from pathlib import Path

import httpx2
import trio

from gateway.codex_home.config_toml import McpServer, ModelProvider
from gateway.config import Config
from gateway.sessions.session import CredentialsFactory, ExecutorsFactory, ModelCredentials
from gateway.store.base import ObjectStore
from gateway.store.local import LocalDirectoryStore


def open_store(config: Config) -> ObjectStore:
    """The configured object store."""
    return LocalDirectoryStore(config.local_store_dir)


class StaticModelCredentials:
    """The provider block with the static key; used until a ModelServer keeper is wired."""

    def __init__(self, config: Config) -> None:
        self._config = config

    async def prime(self) -> None:
        return None

    def provider(self) -> ModelProvider:
        model = self._config.model
        return ModelProvider(
            id=model.provider,
            base_url=model.base_url,
            env_key=model.env_key,
            wire_api=model.wire_api,
        )

    def child_env(self) -> dict[str, str]:
        key = self._config.model.static_api_key
        return {self._config.model.env_key: key.reveal()} if key else {}

    async def keep_fresh(self) -> None:
        await trio.sleep_forever()


def credentials_factory(config: Config, http: httpx2.AsyncClient) -> CredentialsFactory:
    """Build each session's model-credentials keeper."""

    def make(workspace_id: str, runtime_dir: Path) -> ModelCredentials:
        return StaticModelCredentials(config)

    return make


def executors_factory(
    config: Config, http: httpx2.AsyncClient, self_command: tuple[str, ...]
) -> ExecutorsFactory:
    """Build each session's ``[mcp_servers]`` entries (none without an exec gateway)."""

    async def discover(workspace_id: str) -> tuple[McpServer, ...]:
        return ()

    return discover
