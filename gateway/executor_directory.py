"""A session's live view of its workspace's executors, and the tokens it grants for them.

The exec gateway is asked whenever the model calls ``list_environments``, so an executor that
connects after the session started is there at the next call; asks that arrive while one is
on its way share it. A grant (a tool needing a bridge) may rely on an answer up to
``LIST_MAX_AGE`` seconds old: a ``list_environments`` followed by a call costs one request, and
an executor gone meanwhile is refused by the exec gateway's bridge instead (HTTP 503). The
channel's rate limit bounds the rest.

A token is minted per bridge connection, for one executor, only when that executor is listed
for this session's workspace right now, and lives ``CXG_CAPTOKEN_TTL``: a session may run far
longer than that and still reach its executors. The format is exactly the one the exec gateway
verifies today (``gateway/captoken.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote

import attrs
import httpx2
import trio

from gateway.captoken import mint_cap_token
from gateway.clients.execgateway import ConnectedExecutor, ExecGatewayClient, ExecGatewayError
from gateway.codex_home.config_toml import McpServer
from gateway.config import ExecGatewaySettings
from gateway.envmcp.channel import MAX_ENVIRONMENTS, ChannelError, Environment, Grant
from gateway.executors import (
    DEFAULT_TTL_SECONDS,
    clean_description,
    executor_mcp_servers,
    multiplexed_server,
    new_turn_id,
    unusable_reason,
)

log = logging.getLogger(__name__)

LIST_MAX_AGE = 2.0


@attrs.define
class _Snapshot:
    executors: tuple[ConnectedExecutor, ...]
    # When the request that produced it was sent.
    asked_at: float


class ExecutorDirectory:
    """Which executors one workspace has now, and one-executor tokens for them."""

    def __init__(
        self,
        client: ExecGatewayClient,
        settings: ExecGatewaySettings,
        workspace_id: str,
        turn_id: str,
        *,
        max_age: float = LIST_MAX_AGE,
    ) -> None:
        self._client = client
        self._settings = settings
        self.workspace_id = workspace_id
        self.turn_id = turn_id
        self._max_age = max_age
        self._snapshot: _Snapshot | None = None
        self._lock = trio.Lock()

    async def executors(self, max_age: float = 0.0) -> tuple[ConnectedExecutor, ...]:
        """The usable executors listed now; :class:`ChannelError` if the gateway cannot say.

        An answer to a request sent after this call began is always fresh enough (that is how
        concurrent asks share one); an older one only if it is at most ``max_age`` old.
        """
        called_at = trio.current_time()
        async with self._lock:
            snapshot = self._snapshot
            if snapshot is None or snapshot.asked_at < min(
                called_at, trio.current_time() - max_age
            ):
                asked_at = trio.current_time()
                try:
                    listed = await self._client.connected(self.workspace_id)
                except ExecGatewayError as exc:
                    log.warning(
                        "execgw: connected fetch failed: %s",
                        exc,
                        extra={"workspace_id": self.workspace_id},
                    )
                    raise ChannelError(
                        "the exec gateway could not be asked which executors are connected; "
                        "try again in a moment"
                    ) from None
                snapshot = _Snapshot(self._usable(listed), asked_at)
                self._snapshot = snapshot
            return snapshot.executors

    def _usable(self, listed: tuple[ConnectedExecutor, ...]) -> tuple[ConnectedExecutor, ...]:
        usable: list[ConnectedExecutor] = []
        seen: set[str] = set()
        for executor in listed:
            reason = unusable_reason(executor.exe_id)
            if reason is None and executor.exe_id in seen:
                reason = "listed twice"
            if reason is not None:
                log.warning(
                    "execgw: skipping executor whose id is unusable: %s",
                    reason,
                    extra={"workspace_id": self.workspace_id, "exe_id": executor.exe_id[:80]},
                )
                continue
            seen.add(executor.exe_id)
            usable.append(executor)
        return tuple(usable[:MAX_ENVIRONMENTS])

    async def environments(self) -> list[Environment]:
        """The executors as env-mcp shows them."""
        return [
            Environment(
                id=e.exe_id,
                description=clean_description(e.description, e.exe_id),
                default_cwd=e.default_cwd[:1024],
                is_default=e.is_default,
            )
            for e in await self.executors()
        ]

    async def grant(self, exe_id: str) -> Grant:
        """A fresh token for one bridge connection to ``exe_id``, if it is listed now."""
        if exe_id not in {e.exe_id for e in await self.executors(self._max_age)}:
            raise ChannelError(
                f"executor {exe_id!r} is not connected to this workspace; "
                "call list_environments for the ones that are"
            )
        settings = self._settings
        ttl = settings.captoken_ttl if settings.captoken_ttl > 0 else DEFAULT_TTL_SECONDS
        token = mint_cap_token(
            settings.captoken_secret.reveal().encode(), self.turn_id, self.workspace_id, exe_id, ttl
        )
        bridge_url = f"{settings.ws_url.rstrip('/')}/bridge/{quote(exe_id, safe='')}"
        return Grant(bridge_url=bridge_url, token=token)


@attrs.frozen
class ExecutorSetup:
    """What a session gets for its executors: config.toml entries, and a directory to serve.

    ``directory`` is set in the multiplexed layout: the session then serves it on its executor
    channel (``gateway/sessions/executor_channel.py``) for the one env-mcp entry.
    """

    mcp_servers: tuple[McpServer, ...] = ()
    directory: ExecutorDirectory | None = None


async def executor_setup(
    settings: ExecGatewaySettings | None,
    http: httpx2.AsyncClient,
    workspace_id: str,
    self_command: tuple[str, ...],
    channel_path: Path,
) -> ExecutorSetup:
    """The executors of one session start, in the configured layout (none without a gateway)."""
    if settings is None:
        return ExecutorSetup()
    if settings.layout == "per-executor":
        return ExecutorSetup(await executor_mcp_servers(settings, http, workspace_id, self_command))
    client = ExecGatewayClient(http, settings.internal_url, settings.internal_secret)
    directory = ExecutorDirectory(client, settings, workspace_id, new_turn_id())
    return ExecutorSetup((multiplexed_server(settings, self_command, channel_path),), directory)
