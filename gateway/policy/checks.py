"""Parameter checks of the methods in ``methods.CHECKED``: pure functions of the params.

Each check returns ``None`` (allowed) or a :class:`Violation` naming the rule, the operator
setting behind it and one sentence for the client. Paths are checked lexically (absolute, no
``.``/``..`` segments, under a root): the policy does no I/O, so a symlink inside the home
that points out of it is the operating system's to stop (docs/security.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import PurePosixPath
from typing import Any

import attrs

from gateway.config import PolicySettings

SANDBOX_RANK = {"read-only": 0, "workspace-write": 1, "danger-full-access": 2}
# SandboxPolicy objects (turn/start, thread/settings/update, command/exec). "externalSandbox"
# tells codex that something else sandboxes it, i.e. codex itself runs commands unconfined.
_POLICY_TYPE_RANK = {
    "readOnly": 0,
    "workspaceWrite": 1,
    "externalSandbox": 2,
    "dangerFullAccess": 2,
}
# Built-in permission profile ids (permissionProfile/list); any other id names a profile from
# config, which a client could have defined with any permissions.
_PROFILE_RANK = {":read-only": 0, ":workspace": 1, ":danger-full-access": 2}

# Config keys a client may set through `config` overrides or config writes: model choice,
# reasoning and presentation. Everything else is refused, in particular the keys that spawn
# processes or widen bounds: mcp_servers, model_providers/model_provider, profiles, hooks,
# plugins, notify, shell_environment_policy, permissions, *_instructions_file, log_dir,
# sqlite_home, projects, tools, otel, ... (an allow-list, so keys added by a newer codex fail
# closed). sandbox_mode and approval_policy are allowed within the operator's bounds.
_CONFIG_KEYS = frozenset(
    {
        "model",
        "model_reasoning_effort",
        "model_reasoning_summary",
        "model_verbosity",
        "plan_mode_reasoning_effort",
        "service_tier",
        "review_model",
        "personality",
        "approvals_reviewer",
        "developer_instructions",
        "base_instructions",
        "compact_prompt",
        "hide_agent_reasoning",
        "show_raw_agent_reasoning",
        "skills.include_instructions",
        "web_search",
        "sandbox_mode",
        "approval_policy",
        "sandbox_workspace_write.network_access",
        "sandbox_workspace_write.exclude_tmpdir_env_var",
        "sandbox_workspace_write.exclude_slash_tmp",
        "sandbox_workspace_write.writable_roots",
    }
)
# Whole tables a client may write anything into (presentation only).
_CONFIG_TABLES = ("tui", "notice")
# Feature flags a client may toggle: the beta features the TUI's /experimental offers in
# 0.169.0, none of which runs a process or widens the sandbox. The local shell and patch tools
# the gateway switches off (gateway/codex_home/config_toml.py) are not among them.
_FEATURES = frozenset(
    {"analytics_plan_history", "prevent_idle_sleep", "respect_system_proxy", "memories", "goals"}
)
_MAX_CONFIG_DEPTH = 8


@attrs.frozen
class Violation:
    """Why a message is refused."""

    rule: str
    setting: str
    message: str


@attrs.frozen
class Roots:
    """Where a session's client may point codex: read under either root, write under home."""

    home: PurePosixPath
    codex_home: PurePosixPath

    @property
    def readable(self) -> tuple[PurePosixPath, ...]:
        return (self.home, self.codex_home)

    @property
    def writable(self) -> tuple[PurePosixPath, ...]:
        return (self.home,)


@attrs.frozen
class Context:
    """What every check needs: the operator's settings, the session's roots, its provider."""

    settings: PolicySettings
    roots: Roots
    provider: str


Check = Callable[[Context, Mapping[str, Any]], "Violation | None"]


def inside(path: object, roots: tuple[PurePosixPath, ...]) -> bool:
    """Whether ``path`` is an absolute, normalised path at or under one of ``roots``."""
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//"):
        return False
    if "\x00" in path or any(part in (".", "..") for part in path.split("/")):
        return False
    candidate = PurePosixPath(path)
    return any(candidate == root or root in candidate.parents for root in roots)


def _path_violation(field: str, path: object, roots: tuple[PurePosixPath, ...]) -> Violation:
    where = " or ".join(str(root) for root in roots)
    return Violation(
        "path_outside_home",
        "CXG_POLICY_FS",
        f"{field} {str(path)[:200]!r} is outside this session's home ({where})",
    )


def _check_paths(
    field: str, value: object, roots: tuple[PurePosixPath, ...], *, many: bool = False
) -> Violation | None:
    if value is None:
        return None
    values = value if many and isinstance(value, list) else [value]
    for path in values:
        if not inside(path, roots):
            return _path_violation(field, path, roots)
    return None


def sandbox_mode(ctx: Context, field: str, value: object) -> Violation | None:
    """A ``SandboxMode`` string within ``CXG_POLICY_MAX_SANDBOX``."""
    return _ranked_within_max(ctx, field, value, SANDBOX_RANK)


def _ranked_within_max(
    ctx: Context, field: str, value: object, ranks: Mapping[str, int]
) -> Violation | None:
    """A name whose rank in ``ranks`` is at most the maximum sandbox's (absent: no choice)."""
    if value is None:
        return None
    rank = ranks.get(value) if isinstance(value, str) else None
    if rank is None or rank > SANDBOX_RANK[ctx.settings.max_sandbox]:
        return _sandbox_violation(ctx, field, value)
    return None


def _sandbox_violation(ctx: Context, field: str, value: object) -> Violation:
    return Violation(
        "sandbox_beyond_max",
        "CXG_POLICY_MAX_SANDBOX",
        f"{field} {str(value)[:100]!r} is beyond the sandbox this gateway allows "
        f"({ctx.settings.max_sandbox})",
    )


def sandbox_policy(ctx: Context, field: str, value: object) -> Violation | None:
    """A ``SandboxPolicy`` object within the maximum, its writable roots inside the home."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    rank = _POLICY_TYPE_RANK.get(kind) if isinstance(kind, str) else None
    if rank is None or rank > SANDBOX_RANK[ctx.settings.max_sandbox]:
        return _sandbox_violation(ctx, field, kind if kind is not None else value)
    assert isinstance(value, dict)
    return _check_paths(
        f"{field}.writableRoots", value.get("writableRoots"), ctx.roots.writable, many=True
    )


def permission_profile(ctx: Context, field: str, value: object) -> Violation | None:
    """A built-in permission profile id within the maximum."""
    return _ranked_within_max(ctx, field, value, _PROFILE_RANK)


def approval_policy(ctx: Context, field: str, value: object) -> Violation | None:
    """An approval policy in ``CXG_POLICY_APPROVAL_POLICIES``."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == {"granular"}:
        name: object = "granular"
    else:
        name = value
    if not isinstance(name, str) or name not in ctx.settings.approval_policies:
        return Violation(
            "approval_policy_not_allowed",
            "CXG_POLICY_APPROVAL_POLICIES",
            f"{field} {str(value)[:100]!r} is not an approval policy this gateway allows "
            f"({', '.join(ctx.settings.approval_policies)})",
        )
    return None


def _flatten(key: str, value: object, depth: int = 0) -> Iterator[tuple[str, object]]:
    """Dotted leaf paths of a config override map (``{"a": {"b": 1}}`` and ``{"a.b": 1}``)."""
    if isinstance(value, dict) and (value or not key) and depth < _MAX_CONFIG_DEPTH:
        for sub, inner in value.items():
            yield from _flatten(f"{key}.{sub}" if key else str(sub), inner, depth + 1)
    else:
        yield key, value


def config_entries(
    ctx: Context, field: str, entries: Iterator[tuple[str, object]]
) -> Violation | None:
    """Every (dotted key, value) pair of a config override or write is one a client may set."""
    for key, value in entries:
        if key.startswith("sandbox_workspace_write.writable_roots"):
            roots = value if isinstance(value, list) else [value]
            found = _check_paths(f"{field} {key}", roots, ctx.roots.writable, many=True)
            if found:
                return found
            continue
        if key == "sandbox_mode":
            found = sandbox_mode(ctx, f"{field} sandbox_mode", value)
        elif key == "default_permissions":
            # The TUI names the thread's permission profile this way; built-in ones only.
            found = permission_profile(ctx, f"{field} default_permissions", value)
        elif key == "approval_policy" or key.startswith("approval_policy."):
            policy = value if key == "approval_policy" else {"granular": {}}
            found = approval_policy(ctx, f"{field} approval_policy", policy)
        elif key == "mcp_servers" and value == {}:
            found = None  # no MCP servers at all (the TUI's hidden title thread)
        elif _settable(key) or (value is False and _switch_off(key)):
            # Switching a feature off narrows what codex does (the TUI's hidden title thread
            # sends features.code_mode_only = false); switching one on is allow-listed.
            found = None
        else:
            found = Violation(
                "config_key_not_allowed",
                "",
                f"{field} may not set {key[:200]!r}: the gateway owns that configuration",
            )
        if found:
            return found
    return None


def _switch_off(key: str) -> bool:
    """A feature or tool being switched off (the TUI's hidden title thread sends several)."""
    return key.startswith("features.") or key.endswith(".enabled")


def _settable(key: str) -> bool:
    head, _, rest = key.partition(".")
    if key in _CONFIG_KEYS or head in _CONFIG_TABLES:
        return True
    return head == "features" and rest in _FEATURES


def config_map(ctx: Context, field: str, value: object) -> Violation | None:
    """A ``config`` override map (thread/start, thread/resume, thread/fork)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return _malformed(f"{field} must be an object")
    return config_entries(ctx, field, _flatten("", value))


def _malformed(message: str) -> Violation:
    return Violation("malformed_params", "", message)


def _common_thread_settings(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """The settings thread/start, resume, fork, settings/update and turn/start share."""
    return (
        approval_policy(ctx, "approvalPolicy", params.get("approvalPolicy"))
        or permission_profile(ctx, "permissions", params.get("permissions"))
        or _check_paths("cwd", params.get("cwd"), ctx.roots.writable)
        or _check_paths(
            "runtimeWorkspaceRoots",
            params.get("runtimeWorkspaceRoots"),
            ctx.roots.writable,
            many=True,
        )
        or _environments(ctx, params.get("environments"))
        or _provider(ctx, params.get("modelProvider"))
    )


def _environments(ctx: Context, value: object) -> Violation | None:
    if value is None:
        return None
    if not isinstance(value, list):
        return _malformed("environments must be an array")
    for entry in value:
        if not isinstance(entry, dict):
            return _malformed("environments entries must be objects")
        found = _check_paths(
            "environments.cwd", entry.get("cwd"), ctx.roots.writable
        ) or _check_paths(
            "environments.runtimeWorkspaceRoots",
            entry.get("runtimeWorkspaceRoots"),
            ctx.roots.writable,
            many=True,
        )
        if found:
            return found
    return None


def _provider(ctx: Context, value: object) -> Violation | None:
    if value is None or value == ctx.provider:
        return None
    return Violation(
        "model_provider_not_allowed",
        "CXG_MODEL_PROVIDER",
        f"modelProvider {str(value)[:100]!r} is not this gateway's provider ({ctx.provider})",
    )


def _inputs(ctx: Context, value: object) -> Violation | None:
    """User input items that name a local file (localImage, mentions) point inside the home."""
    if not isinstance(value, list):
        return None
    for item in value:
        if isinstance(item, dict) and "path" in item:
            found = _check_paths("input.path", item["path"], ctx.roots.readable)
            if found:
                return found
    return None


def check_thread_start(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """thread/start, thread/resume, thread/fork."""
    selected = params.get("selectedCapabilityRoots")
    paths = [
        root.get("location", {}).get("path")
        for root in (selected if isinstance(selected, list) else [])
        if isinstance(root, dict) and isinstance(root.get("location"), dict)
    ]
    return (
        sandbox_mode(ctx, "sandbox", params.get("sandbox"))
        or _common_thread_settings(ctx, params)
        or config_map(ctx, "config", params.get("config"))
        # resume/fork from a rollout file: only the session's own.
        or _check_paths("path", params.get("path"), (ctx.roots.codex_home,))
        or _check_paths(
            "selectedCapabilityRoots.path", paths or None, ctx.roots.readable, many=True
        )
    )


def check_turn_settings(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """thread/settings/update and turn/start."""
    return (
        sandbox_policy(ctx, "sandboxPolicy", params.get("sandboxPolicy"))
        or _common_thread_settings(ctx, params)
        or _inputs(ctx, params.get("input"))
    )


def check_turn_steer(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """turn/steer: only its input items can name files."""
    return _inputs(ctx, params.get("input"))


def check_command_exec(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """command/exec: sandbox within the maximum (null is the configured default), cwd in home."""
    return (
        sandbox_policy(ctx, "sandboxPolicy", params.get("sandboxPolicy"))
        or permission_profile(ctx, "permissionProfile", params.get("permissionProfile"))
        or _check_paths("cwd", params.get("cwd"), ctx.roots.writable)
    )


def check_shell_command(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """thread/shellCommand runs unsandboxed: allowed only by CXG_POLICY_ALLOW_SHELL_COMMAND."""
    if ctx.settings.allow_shell_command:
        return None
    return Violation(
        "shell_command_off",
        "CXG_POLICY_ALLOW_SHELL_COMMAND",
        "shell commands (thread/shellCommand, the TUI's !cmd) are switched off on this gateway",
    )


def _config_write_target(params: Mapping[str, Any]) -> Violation | None:
    if params.get("filePath") is not None:
        return Violation(
            "config_key_not_allowed",
            "",
            "config writes may only go to the session's own config.toml (omit filePath)",
        )
    return None


def _edit_entries(edit: Mapping[str, Any]) -> Iterator[tuple[str, object]]:
    key = edit.get("keyPath")
    yield from _flatten(key if isinstance(key, str) else "", edit.get("value"))


def check_config_value_write(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """config/value/write: one key, from the same allow-list as overrides."""
    if not isinstance(params.get("keyPath"), str):
        return _malformed("keyPath must be a string")
    return _config_write_target(params) or config_entries(
        ctx, "config/value/write", _edit_entries(params)
    )


def check_config_batch_write(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """config/batchWrite: every edit from the allow-list."""
    edits = params.get("edits")
    if not isinstance(edits, list) or not all(
        isinstance(edit, dict) and isinstance(edit.get("keyPath"), str) for edit in edits
    ):
        return _malformed("edits must be an array of {keyPath, value} objects")
    found = _config_write_target(params)
    for edit in edits:
        found = found or config_entries(ctx, "config/batchWrite", _edit_entries(edit))
    return found


def check_fuzzy_roots(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """fuzzyFileSearch*: the directories whose file names are searched."""
    return _check_paths("roots", params.get("roots"), ctx.roots.readable, many=True)


def _fs_unbounded(ctx: Context) -> bool:
    # CXG_POLICY_FS=any: the operator leaves fs/* paths to the OS (the child's own uid).
    return ctx.settings.fs_access == "any"


def _fs_off(ctx: Context) -> Violation | None:
    if ctx.settings.fs_access == "off":
        return Violation("fs_off", "CXG_POLICY_FS", "fs/* methods are switched off on this gateway")
    return None


def check_fs_read(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """fs/readFile, fs/getMetadata, fs/readDirectory, fs/watch: under home or CODEX_HOME."""
    if _fs_unbounded(ctx):
        return None
    return _fs_off(ctx) or _required_path(ctx, "path", params.get("path"), ctx.roots.readable)


def check_fs_write(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """fs/writeFile, fs/createDirectory, fs/remove: under home only (CODEX_HOME holds the
    gateway-rendered config.toml, whose provider and MCP entries a write could rewrite)."""
    if _fs_unbounded(ctx):
        return None
    return _fs_off(ctx) or _required_path(ctx, "path", params.get("path"), ctx.roots.writable)


def check_fs_copy(ctx: Context, params: Mapping[str, Any]) -> Violation | None:
    """fs/copy: read the source, write the destination."""
    if _fs_unbounded(ctx):
        return None
    return (
        _fs_off(ctx)
        or _required_path(ctx, "sourcePath", params.get("sourcePath"), ctx.roots.readable)
        or _required_path(ctx, "destinationPath", params.get("destinationPath"), ctx.roots.writable)
    )


def _required_path(
    ctx: Context, field: str, value: object, roots: tuple[PurePosixPath, ...]
) -> Violation | None:
    if not inside(value, roots):
        return _path_violation(field, value, roots)
    return None


CHECKS: dict[str, Check] = {
    "thread/start": check_thread_start,
    "thread/resume": check_thread_start,
    "thread/fork": check_thread_start,
    "thread/settings/update": check_turn_settings,
    "turn/start": check_turn_settings,
    "turn/steer": check_turn_steer,
    "command/exec": check_command_exec,
    "thread/shellCommand": check_shell_command,
    "config/value/write": check_config_value_write,
    "config/batchWrite": check_config_batch_write,
    "fuzzyFileSearch": check_fuzzy_roots,
    "fuzzyFileSearch/sessionStart": check_fuzzy_roots,
    "fuzzyFileSearch/sessionUpdate": check_fuzzy_roots,
    "fuzzyFileSearch/sessionStop": check_fuzzy_roots,
    "fs/readFile": check_fs_read,
    "fs/getMetadata": check_fs_read,
    "fs/readDirectory": check_fs_read,
    "fs/watch": check_fs_read,
    "fs/writeFile": check_fs_write,
    "fs/createDirectory": check_fs_write,
    "fs/remove": check_fs_write,
    "fs/copy": check_fs_copy,
}
