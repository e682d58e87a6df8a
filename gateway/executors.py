"""The ``[mcp_servers]`` entries that give a session's codex its executors.

Two layouts (``CXG_EXECUTOR_MCP_LAYOUT``):

* ``multiplexed`` (default): one entry, ``[mcp_servers.executors]``, whose env-mcp asks the
  session for the live executor list and a fresh token per bridge connection over a private
  unix socket (``gateway/envmcp/channel.py``, ``gateway/sessions/executor_channel.py``). The
  entry carries the socket's path and no secret.
* ``per-executor`` (the Go seed): at spawn the exec gateway is asked which executors the
  workspace has connected; each gets a capability token and an entry that runs this gateway as
  ``env-mcp`` (upstream ``makeBuildConfig``, ``reference/upstream-spec.md`` §5.4). The token
  travels in the entry's ``env``, never in argv. When the exec gateway cannot be asked, the
  session starts without executors: chat still works, only remote tools are missing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import httpx2

from gateway.captoken import mint_cap_token
from gateway.clients.execgateway import ConnectedExecutor, ExecGatewayClient, ExecGatewayError
from gateway.codex_home.config_toml import McpServer
from gateway.config import ExecGatewaySettings
from gateway.envmcp.channel import CHANNEL_ENV

# How long one shell command may run on an executor (builds and test suites take minutes).
SHELL_TIME_LIMIT_SECONDS = 600.0
TOOL_TIMEOUT_MARGIN_SECONDS = 30

log = logging.getLogger(__name__)

TOKEN_ENV_PREFIX = "CXG_BRIDGE_TOKEN_"
# The multiplexed entry's name, hence the model's tool namespace ``mcp__executors``.
MULTIPLEXED_SERVER_NAME = "executors"
DEFAULT_TTL_SECONDS = 3600.0
# codex accepts MCP server names made of ASCII letters, digits, "_" and "-"; the name also
# becomes the model-visible tool namespace ``mcp__<name>``, so it is kept short.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
_SAFE_ENV = re.compile(r"^[A-Z0-9_]+$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_]+")
MAX_EXE_ID_LENGTH = 256
MAX_DESCRIPTION_LENGTH = 200
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def new_turn_id() -> str:
    """One id per spawn, shared by every executor token of that spawn (``trn_`` + 8 base36)."""
    return "trn_" + "".join(secrets.choice(_BASE36) for _ in range(8))


def upstream_token_env(exe_id: str) -> str:
    """The Go gateway's variable name: ``exe-a-b`` → ``CXG_BRIDGE_TOKEN_EXE_A_B``."""
    return TOKEN_ENV_PREFIX + exe_id.replace("-", "_").upper()


def _digest(exe_id: str) -> str:
    return hashlib.sha256(exe_id.encode("utf-8", errors="surrogatepass")).hexdigest()[:8]


def _derived_key(exe_id: str) -> str:
    """A stable ``[A-Za-z0-9_]`` key for an id that cannot be used as it is.

    The hash of the full id keeps two ids that sanitise alike (``a.b`` and ``a/b``) apart.
    """
    readable = _UNSAFE_CHARS.sub("_", exe_id).strip("_")[:30]
    return f"{readable}_{_digest(exe_id)}" if readable else f"exe_{_digest(exe_id)}"


def server_name(exe_id: str) -> str:
    """The ``[mcp_servers.<name>]`` key: the id itself when codex accepts it (as upstream)."""
    return exe_id if _SAFE_NAME.match(exe_id) else _derived_key(exe_id)


def unusable_reason(exe_id: str) -> str | None:
    if len(exe_id) > MAX_EXE_ID_LENGTH:
        return f"longer than {MAX_EXE_ID_LENGTH} characters"
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in exe_id):
        # Control characters (NUL above all) cannot travel in argv or a URL path.
        return "contains control characters"
    return None


def clean_description(description: str, exe_id: str) -> str:
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cs") else c for c in description)
    text = " ".join(text.split())[:MAX_DESCRIPTION_LENGTH]
    return text or exe_id


def _token_env_names(exe_ids: Iterable[str]) -> dict[str, str]:
    """Variable names per id: upstream's where that is a safe name used by one id only.

    ``exe-a`` and ``exe_a`` share the upstream name; both then get a hash-suffixed name, so the
    outcome does not depend on the order the exec gateway lists them in.
    """
    ids = list(exe_ids)
    upstream = {exe_id: upstream_token_env(exe_id) for exe_id in ids}
    counts = Counter(upstream.values())
    names = {}
    for exe_id, name in upstream.items():
        if _SAFE_ENV.match(name) and counts[name] == 1:
            names[exe_id] = name
        else:
            names[exe_id] = TOKEN_ENV_PREFIX + _derived_key(exe_id).upper()
    return names


def executor_servers_for(
    executors: Iterable[ConnectedExecutor],
    *,
    settings: ExecGatewaySettings,
    workspace_id: str,
    turn_id: str,
    self_command: tuple[str, ...],
    now: float | None = None,
) -> tuple[McpServer, ...]:
    """Build one MCP server entry per usable executor (pure: no I/O).

    Ids that codex, TOML, argv or a URL cannot carry as they are get a derived server name and
    variable name, or — when nothing sensible can be derived — are skipped with a warning.
    """
    if not self_command:
        raise ValueError("self_command must name the gateway executable")
    ttl = settings.captoken_ttl if settings.captoken_ttl > 0 else DEFAULT_TTL_SECONDS
    secret = settings.captoken_secret.reveal().encode()
    usable: list[ConnectedExecutor] = []
    seen: set[str] = set()
    for executor in executors:
        reason = unusable_reason(executor.exe_id)
        if reason is None and executor.exe_id in seen:
            reason = "listed twice"
        if reason is not None:
            log.warning(
                "execgw: skipping executor whose id is unusable: %s",
                reason,
                extra={"workspace_id": workspace_id, "exe_id": executor.exe_id[:80]},
            )
            continue
        seen.add(executor.exe_id)
        usable.append(executor)

    env_names = _token_env_names(e.exe_id for e in usable)
    servers: list[McpServer] = []
    used_names: set[str] = set()
    for executor in usable:
        exe_id = executor.exe_id
        name = server_name(exe_id)
        if name in used_names:
            # Only possible when a real id happens to equal another id's derived name.
            log.warning(
                "execgw: skipping executor whose server name %r is already taken",
                name,
                extra={"workspace_id": workspace_id, "exe_id": exe_id},
            )
            continue
        used_names.add(name)
        token_env = env_names[exe_id]
        token = mint_cap_token(secret, turn_id, workspace_id, exe_id, ttl, now=now)
        bridge_url = f"{settings.ws_url.rstrip('/')}/bridge/{quote(exe_id, safe='')}"
        args = (
            *self_command[1:],
            "env-mcp",
            "--exe-id",
            exe_id,
            "--bridge-url",
            bridge_url,
            "--token-env",
            token_env,
            "--exe-desc",
            clean_description(executor.description, exe_id),
            "--turn-id",
            turn_id,
            "--timeout",
            f"{SHELL_TIME_LIMIT_SECONDS:g}",
        )
        servers.append(
            McpServer(
                name=name,
                command=self_command[0],
                args=args,
                env={token_env: token},
                default_tools_approval_mode="approve",
                # codex must wait longer than env-mcp's own limit, which kills the command and
                # still answers; otherwise codex gives up first and the remote process lingers.
                tool_timeout_sec=int(SHELL_TIME_LIMIT_SECONDS) + TOOL_TIMEOUT_MARGIN_SECONDS,
                # Explicit, so a hung env-mcp cannot hold the first turn for codex's 30 s default.
                startup_timeout_sec=settings.startup_timeout,
            )
        )
    return tuple(servers)


def multiplexed_server(
    settings: ExecGatewaySettings, self_command: tuple[str, ...], channel_path: Path
) -> McpServer:
    """The one entry of the multiplexed layout: env-mcp reaching the session at ``channel_path``.

    The path travels in the entry's ``env`` (it is no secret: the socket admits only the
    session's own processes); argv names only the variable.
    """
    if not self_command:
        raise ValueError("self_command must name the gateway executable")
    return McpServer(
        name=MULTIPLEXED_SERVER_NAME,
        command=self_command[0],
        args=(
            *self_command[1:],
            "env-mcp",
            "--channel-env",
            CHANNEL_ENV,
            "--timeout",
            f"{SHELL_TIME_LIMIT_SECONDS:g}",
        ),
        env={CHANNEL_ENV: str(channel_path)},
        default_tools_approval_mode="approve",
        tool_timeout_sec=int(SHELL_TIME_LIMIT_SECONDS) + TOOL_TIMEOUT_MARGIN_SECONDS,
        startup_timeout_sec=settings.startup_timeout,
    )


async def executor_mcp_servers(
    settings: ExecGatewaySettings | None,
    http: httpx2.AsyncClient,
    workspace_id: str,
    self_command: tuple[str, ...],
) -> tuple[McpServer, ...]:
    """The MCP server entries for ``workspace_id``'s connected executors, for one spawn.

    ``self_command`` is how to run this gateway (e.g. ``(sys.executable, "-m", "gateway")``);
    ``env-mcp`` and its flags are appended. No exec gateway configured, or one that is down or
    answers nonsense, gives ``()`` (with a warning for the latter): the session still starts.
    """
    if settings is None:
        return ()
    client = ExecGatewayClient(http, settings.internal_url, settings.internal_secret)
    try:
        executors = await client.connected(workspace_id)
    except ExecGatewayError as exc:
        log.warning(
            "execgw: connected fetch failed; spawning with no executors: %s",
            exc,
            extra={"workspace_id": workspace_id},
        )
        return ()
    return executor_servers_for(
        executors,
        settings=settings,
        workspace_id=workspace_id,
        turn_id=new_turn_id(),
        self_command=self_command,
    )
