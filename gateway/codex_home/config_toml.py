"""Rendering of the ``config.toml`` a session's codex reads (pure functions, no I/O).

The shape follows the Go service (model provider block, trusted projects, local shell tools
switched off, one ``[mcp_servers.<exe>]`` per executor with its token in ``env``, never in argv).
Unlike the Go service, a ``config.toml`` restored from the store is merged rather than
replaced: codex itself writes to it (project trust, user settings), and that must not be lost,
while every key the gateway manages is forced to the gateway's value.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

import attrs
import tomli_w

# codex's own shell and patch tools run inside the pod; executors replace them (upstream §5.3).
DISABLED_LOCAL_TOOLS = {"shell_tool": False, "unified_exec": False, "apply_patch_freeform": False}
# codex waits only this long (from the first turn) for MCP servers still starting before its first
# model request, and leaves out any not ready by then: a user who types at once would get a first
# turn without executors. 0 makes it wait for each server's own ``startup_timeout_sec`` instead,
# which the gateway keeps short, so a hung server delays the first turn by that much at most.
MCP_STARTUP_GRACE_MS = 0


@attrs.frozen
class ProviderAuth:
    """A command codex runs to obtain the provider's bearer token (and re-runs to refresh it)."""

    command: str
    args: tuple[str, ...] = ()
    timeout_ms: int = 5000
    refresh_interval_ms: int = 60000


@attrs.frozen
class ModelProvider:
    """One ``[model_providers.<id>]`` block."""

    id: str
    base_url: str
    wire_api: str = "responses"
    env_key: str | None = None
    auth: ProviderAuth | None = None
    name: str | None = None


@attrs.frozen
class McpServer:
    """One stdio MCP server codex spawns; ``env`` carries secrets so argv never does."""

    name: str
    command: str
    args: tuple[str, ...]
    env: Mapping[str, str] = attrs.field(factory=dict, repr=False)
    default_tools_approval_mode: str | None = "approve"
    tool_timeout_sec: int | None = None
    # Seconds codex gives the server to start and answer its first ``tools/list``.
    startup_timeout_sec: float | None = None


@attrs.frozen
class CodexConfig:
    """Everything the gateway decides about a session's codex configuration."""

    model: str
    provider: ModelProvider
    trusted_paths: tuple[str, ...] = ("/tmp",)
    mcp_servers: tuple[McpServer, ...] = ()


def managed_document(config: CodexConfig) -> dict[str, Any]:
    """The TOML document of the keys the gateway owns, in the Go service's order."""
    provider: dict[str, Any] = {
        "name": config.provider.name or config.provider.id,
        "base_url": config.provider.base_url,
    }
    if config.provider.env_key:
        provider["env_key"] = config.provider.env_key
    provider["wire_api"] = config.provider.wire_api
    if config.provider.auth is not None:
        auth = config.provider.auth
        provider["auth"] = {
            "command": auth.command,
            "args": list(auth.args),
            "timeout_ms": auth.timeout_ms,
            "refresh_interval_ms": auth.refresh_interval_ms,
        }
    document: dict[str, Any] = {
        "model_provider": config.provider.id,
        "model": config.model,
        "mcp_optional_startup_grace_ms": MCP_STARTUP_GRACE_MS,
        "model_providers": {config.provider.id: provider},
        "projects": {path: {"trust_level": "trusted"} for path in config.trusted_paths},
        "features": dict(DISABLED_LOCAL_TOOLS),
    }
    servers: dict[str, Any] = {}
    for server in config.mcp_servers:
        entry: dict[str, Any] = {"command": server.command, "args": list(server.args)}
        if server.env:
            entry["env"] = dict(server.env)
        if server.default_tools_approval_mode:
            entry["default_tools_approval_mode"] = server.default_tools_approval_mode
        if server.startup_timeout_sec is not None:
            entry["startup_timeout_sec"] = server.startup_timeout_sec
        if server.tool_timeout_sec is not None:
            entry["tool_timeout_sec"] = server.tool_timeout_sec
        servers[server.name] = entry
    if servers:
        document["mcp_servers"] = servers
    return document


def merge_with_existing(existing: Mapping[str, Any], managed: Mapping[str, Any]) -> dict[str, Any]:
    """Overlay the gateway's keys on a config codex may have written to.

    Kept from ``existing``: every key the gateway does not manage (user settings, other model
    providers, other projects' trust). Forced: the active provider, the model, the MCP startup
    grace, our feature flags and trusted paths. ``mcp_servers`` is replaced whole, so executors
    that went away since the archive was saved do not linger with expired tokens.
    """
    merged: dict[str, Any] = {k: v for k, v in existing.items() if k != "mcp_servers"}
    merged["model_provider"] = managed["model_provider"]
    merged["model"] = managed["model"]
    merged["mcp_optional_startup_grace_ms"] = managed["mcp_optional_startup_grace_ms"]
    for table in ("model_providers", "projects", "features"):
        current = merged.get(table)
        combined = dict(current) if isinstance(current, Mapping) else {}
        combined.update(managed[table])
        merged[table] = combined
    if "mcp_servers" in managed:
        merged["mcp_servers"] = managed["mcp_servers"]
    return merged


def render_config_toml(config: CodexConfig, existing_text: str | None = None) -> str:
    """Render ``config.toml``, merged over ``existing_text`` when it is valid TOML.

    An unreadable existing file is replaced rather than trusted: a session must start with a
    configuration the gateway controls.
    """
    managed = managed_document(config)
    existing: dict[str, Any] = {}
    if existing_text:
        try:
            existing = tomllib.loads(existing_text)
        except tomllib.TOMLDecodeError:
            existing = {}
    return tomli_w.dumps(merge_with_existing(existing, managed))
