"""The daemon's configuration: every ``CXG_*`` variable, parsed and validated once at start.

Variables keep the Go service's names, defaults and meaning (``docs/configuration.md`` lists
them all). ``VARIABLES`` names each one with its default and its kind (``str``, ``int``,
``bool``, ``Seconds``, ``ByteSize``, ``CsvList``, ``Secret``, and the Go-compatible
``GoTrueOnly``, ``LogLevel``, ``UidRangeText``); ``_read`` turns every raw string
into a value with the plain parser ``_PARSERS`` holds for that kind (Go durations, byte sizes,
comma lists, secrets), and ``load_config`` checks the values and builds the frozen attrs
classes below by hand. No structuring library is involved. Any bad value raises
``ConfigError`` with one sentence naming the variable and the offending value — except for
secrets, whose values are never echoed.

``CXG_MODEL_PROVIDER_ENV_KEY`` is accepted (and must not be empty) for compatibility with the
Go service's deployments, and otherwise ignored: the child gets its model token from a file,
never from an environment variable (``gateway.credentials.session``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any, NewType
from urllib.parse import urlsplit

import attrs

from gateway.durations import parse_byte_size, parse_go_duration

Seconds = NewType("Seconds", float)
ByteSize = NewType("ByteSize", int)
CsvList = NewType("CsvList", tuple[str, ...])
UidRangeText = NewType("UidRangeText", tuple[int, int])
# CXG_S3_PATH_STYLE: the Go service's own rule (only "true", any case, is true).
GoTrueOnly = NewType("GoTrueOnly", bool)
LogLevel = NewType("LogLevel", str)


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


@attrs.frozen
class Secret:
    """A secret value that never shows up in a repr, a log line or an error message."""

    _value: str = attrs.field(repr=False, alias="value")

    def reveal(self) -> str:
        """Return the secret itself, for the one place that must send or sign with it."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@attrs.frozen
class AgentserverSettings:
    """agentserver's internal API: the token verifier and the ModelServer token endpoint."""

    internal_url: str
    internal_secret: Secret


@attrs.frozen
class S3Settings:
    """Where CODEX_HOME archives live when an S3 bucket is configured."""

    bucket: str
    endpoint: str | None
    region: str
    access_key_id: str
    secret_access_key: Secret
    path_style: bool
    # The time bound of one S3 request (see ``gateway.store.s3``), in seconds.
    timeout: float = 5.0
    # Run even when the store ignores conditional writes (no fencing): an explicit opt-in.
    allow_unfenced: bool = False


@attrs.frozen
class ExecGatewaySettings:
    """codex-exec-gateway: which executors a workspace has, and how env-mcp reaches them."""

    ws_url: str
    internal_url: str
    internal_secret: Secret
    captoken_secret: Secret
    captoken_ttl: float
    # How long codex waits for one env-mcp to answer ``tools/list`` before a first turn goes
    # without that executor (config.toml ``startup_timeout_sec``).
    startup_timeout: float = 10.0
    # ``multiplexed``: one env-mcp per session with a live executor list (CXG_EXECUTOR_MCP_LAYOUT);
    # ``per-executor``: the Go seed's one entry per executor, with tokens minted at spawn.
    layout: str = "multiplexed"


@attrs.frozen
class ModelSettings:
    """The model provider block rendered into each session's config.toml."""

    provider: str
    model: str
    base_url: str
    wire_api: str
    static_api_key: Secret | None
    token_refresh_interval: float


@attrs.frozen
class RestoreLimits:
    """Bounds applied to every archive restored into a CODEX_HOME (hostile-input safety)."""

    max_total_bytes: int
    max_entries: int
    # An archive may unpack to this many times its stored size (0: no such bound).
    max_ratio: int = 0


SANDBOX_MODES = ("read-only", "workspace-write", "danger-full-access")
APPROVAL_POLICIES = ("untrusted", "on-request", "never", "granular")
FS_ACCESS = ("home", "off", "any")


@attrs.frozen
class PolicySettings:
    """What a client may ask of its session's codex (``gateway/policy``, docs/security.md)."""

    max_sandbox: str = "workspace-write"
    approval_policies: tuple[str, ...] = APPROVAL_POLICIES
    fs_access: str = "home"
    allow_shell_command: bool = True
    deny_methods: tuple[str, ...] = ()
    extra_methods: tuple[str, ...] = ()


@attrs.frozen
class ReplicaSettings:
    """Replica mode (``CXG_PEER_ADDR`` set): several pods share the store, one owner each.

    The heartbeat interval and the self-fencing bound derive from ``takeover_after`` so that
    an owner always fences itself (kills its children, closes its clients) before any peer can
    judge it silent and take its workspaces: see docs/operations.md.
    """

    pod_name: str
    peer_addr: str
    peer_listen_addr: str
    peer_secret: Secret
    takeover_after: float = 25.0

    @property
    def heartbeat_interval(self) -> float:
        """How often this pod rewrites its heartbeat object (and reads its peers')."""
        return self.takeover_after / 5

    @property
    def fence_after(self) -> float:
        """Without a renewed heartbeat for this long, this pod fences itself."""
        return self.takeover_after * 3 / 5


@attrs.frozen
class Config:
    """Everything ``serve`` needs, validated."""

    listen_addr: str
    codex_bin: str
    tmp_root: str
    idle_shutdown: float
    log_level: str
    log_format: str
    inbound_hmac_secret: Secret | None
    agentserver: AgentserverSettings | None
    # HMAC tokens next to the agentserver verifier only with CXG_ALLOW_HMAC_TOKENS=true.
    allow_hmac_tokens: bool
    s3: S3Settings | None
    local_store_dir: str
    exec_gateway: ExecGatewaySettings | None
    captoken_ttl: float
    model: ModelSettings
    project_trusted_paths: tuple[str, ...]
    checkpoint_interval: float
    max_sessions: int
    ws_max_message_size: int
    ws_ping_interval: float
    ws_inflight_budget: int
    max_clients_per_workspace: int
    child_ready_timeout: float
    child_stop_grace: float
    drain_budget: float
    admin_secret: Secret | None
    allowed_origins: tuple[str, ...]
    restore_limits: RestoreLimits
    metrics_listen_addr: str | None
    child_isolation: str = "auto"
    child_uid_range: tuple[int, int] = (100000, 165535)
    policy: PolicySettings = PolicySettings()
    # None: the single-pod daemon (no ownership records, no internal listener).
    replicas: ReplicaSettings | None = None


@attrs.frozen
class _Var:
    """One environment variable: its name, its default and its kind (a key of ``_PARSERS``)."""

    name: str
    default: str | None
    type: Any
    secret: bool = False


# Every variable the daemon reads. Order only matters for docs and tests that walk the table.
VARIABLES: tuple[_Var, ...] = (
    _Var("CXG_LISTEN_ADDR", ":8086", str),
    _Var("CXG_CODEX_BIN", "codex", str),
    _Var("CXG_TMP_ROOT", "/tmp/codex-app-gateway", str),
    _Var("CXG_IDLE_SHUTDOWN", "30m", Seconds),
    _Var("CXG_CAPTOKEN_TTL", "24h", Seconds),
    _Var("CXG_LOG_LEVEL", "info", LogLevel),
    _Var("CXG_LOG_FORMAT", "json", str),
    _Var("CXG_S3_ENDPOINT", None, str),
    _Var("CXG_S3_REGION", "us-east-1", str),
    _Var("CXG_S3_BUCKET", None, str),
    _Var("CXG_S3_ACCESS_KEY_ID", "", str),
    _Var("CXG_S3_SECRET_ACCESS_KEY", "", Secret, secret=True),
    _Var("CXG_S3_PATH_STYLE", "false", GoTrueOnly),
    _Var("CXG_S3_TIMEOUT", "5s", Seconds),
    _Var("CXG_S3_ALLOW_UNFENCED", "false", bool),
    _Var("CXG_LOCAL_STORE_DIR", "/tmp/codex-app-gateway-store", str),
    _Var("CXG_INBOUND_HMAC_SECRET", None, Secret, secret=True),
    _Var("CXG_ALLOW_HMAC_TOKENS", "false", bool),
    _Var("CXG_EXEC_GATEWAY_URL", None, str),
    _Var("CXG_EXEC_GATEWAY_INTERNAL_URL", None, str),
    _Var("CXG_EXEC_GATEWAY_INTERNAL_SECRET", None, Secret, secret=True),
    _Var("CXG_CAPTOKEN_HMAC_SECRET", None, Secret, secret=True),
    _Var("CXG_EXECUTOR_STARTUP_TIMEOUT", "10s", Seconds),
    _Var("CXG_EXECUTOR_MCP_LAYOUT", "multiplexed", str),
    _Var("CXG_MODEL_PROVIDER", "modelserver", str),
    _Var("CXG_MODEL", "gpt-5.5", str),
    _Var("CXG_MODEL_PROVIDER_BASE_URL", "http://llmproxy:8085/v1", str),
    _Var("CXG_MODEL_PROVIDER_ENV_KEY", "CODEX_API_KEY", str),
    _Var("CXG_MODEL_PROVIDER_WIRE_API", "responses", str),
    _Var("CXG_CODEX_API_KEY", None, Secret, secret=True),
    _Var("CXG_MODEL_TOKEN_REFRESH_INTERVAL", "5m", Seconds),
    _Var("CXG_PROJECT_TRUSTED_PATHS", "", CsvList),
    _Var("CXG_AGENTSERVER_INTERNAL_URL", None, str),
    _Var("CXG_AGENTSERVER_INTERNAL_SECRET", None, Secret, secret=True),
    _Var("CXG_CHECKPOINT_INTERVAL", "5m", Seconds),
    _Var("CXG_MAX_SESSIONS", "100", int),
    _Var("CXG_WS_MAX_MESSAGE_SIZE", "64MiB", ByteSize),
    _Var("CXG_WS_PING_INTERVAL", "30s", Seconds),
    _Var("CXG_WS_INFLIGHT_BUDGET", "256MiB", ByteSize),
    _Var("CXG_MAX_CLIENTS_PER_WORKSPACE", "64", int),
    _Var("CXG_CHILD_READY_TIMEOUT", "60s", Seconds),
    _Var("CXG_CHILD_STOP_GRACE", "10s", Seconds),
    _Var("CXG_DRAIN_BUDGET", "30s", Seconds),
    _Var("CXG_ADMIN_SECRET", None, Secret, secret=True),
    _Var("CXG_ALLOWED_ORIGINS", "", CsvList),
    _Var("CXG_RESTORE_MAX_BYTES", "8GiB", ByteSize),
    _Var("CXG_RESTORE_MAX_ENTRIES", "200000", int),
    _Var("CXG_RESTORE_MAX_RATIO", "100", int),
    _Var("CXG_METRICS_LISTEN_ADDR", None, str),
    _Var("CXG_CHILD_ISOLATION", "auto", str),
    _Var("CXG_CHILD_UID_RANGE", "100000-165535", UidRangeText),
    _Var("CXG_POLICY_MAX_SANDBOX", "workspace-write", str),
    _Var("CXG_POLICY_APPROVAL_POLICIES", ",".join(APPROVAL_POLICIES), CsvList),
    _Var("CXG_POLICY_FS", "home", str),
    _Var("CXG_POLICY_ALLOW_SHELL_COMMAND", "true", bool),
    _Var("CXG_POLICY_DENY_METHODS", "", CsvList),
    _Var("CXG_POLICY_EXTRA_METHODS", "", CsvList),
    _Var("CXG_PEER_ADDR", None, str),
    _Var("CXG_POD_NAME", "", str),
    _Var("CXG_PEER_LISTEN_ADDR", ":8087", str),
    _Var("CXG_PEER_SECRET", None, Secret, secret=True),
    _Var("CXG_OWNER_TAKEOVER_AFTER", "25s", Seconds),
)
SECRET_NAMES = tuple(var.name for var in VARIABLES if var.secret)
# Each secret may instead be given as the path of a file (``CXG_<NAME>_FILE``), so that it is in
# no environment block at all; the file must be readable by the gateway's user alone.
VARIABLES = VARIABLES + tuple(_Var(f"{name}_FILE", None, str) for name in SECRET_NAMES)
_ISOLATION_MODES = ("auto", "required", "off")
_EXECUTOR_LAYOUTS = ("multiplexed", "per-executor")

_LOG_LEVELS = ("debug", "info", "warn", "error")
_LOG_FORMATS = ("json", "text")
# strconv.ParseBool, the grammar Go programs use for booleans: exactly these spellings.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
# strconv.Atoi: an optional sign and ASCII digits (Python's int() also takes "1_000", "١٢").
_GO_INT = re.compile(r"[+-]?[0-9]+")


def _parse_seconds(value: str) -> float:
    seconds = parse_go_duration(value)
    if seconds < 0:
        raise ValueError(f"negative duration {value!r}")
    return seconds


def _parse_bool(value: str) -> bool:
    # New variables: strconv.ParseBool's spellings, and nothing else.
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    raise ValueError(f"invalid boolean {value!r} (expected true or false)")


def _parse_go_true_only(value: str) -> bool:
    # The Go service read CXG_S3_PATH_STYLE as true only for "true" in any case, and as false
    # for everything else. Spellings that clearly mean false keep meaning false; the ones that
    # meant false in Go but read as "yes" ("1", "on", "t", …) are refused: silently taking them
    # as true would change a Go deployment's addressing, and as false would hide the typo.
    if value.lower() == "true":
        return True
    if value.lower() in ("false", "0", "f", "no", "off"):
        return False
    raise ValueError(
        f"invalid boolean {value!r} (expected true or false; "
        "the Go service read anything but 'true' as false)"
    )


def _parse_log_level(value: str) -> str:
    # The Go service lower-cased the value and knew debug, warn and error; everything else
    # (including "warning" and typos) silently meant info. Known levels mean what they meant
    # there; anything else is refused rather than read as info or as something new.
    level = value.lower()
    if level not in _LOG_LEVELS:
        hint = " (use warn)" if level == "warning" else ""
        raise ValueError(
            f"unknown level {value!r}{hint}; expected debug, info, warn or error "
            "(the Go service read an unknown level as info)"
        )
    return level


def _parse_int(value: str) -> int:
    if not _GO_INT.fullmatch(value.strip()):
        raise ValueError(f"not a whole number {value!r}")
    number = int(value.strip())
    if number < 0:
        raise ValueError(f"negative number {value!r}")
    return number


def _parse_csv(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def parse_uid_range(value: str) -> tuple[int, int]:
    """``FIRST-LAST`` (inclusive, e.g. ``100000-165535``) as a pair; ``ValueError`` if malformed."""
    parts = value.strip().split("-")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"invalid uid range {value!r} (expected FIRST-LAST, e.g. 100000-165535)")
    first, last = (int(part) for part in parts)
    if first < 1 or last > 2**32 - 2 or first > last:
        raise ValueError(f"invalid uid range {value!r} (need 1 <= FIRST <= LAST <= 4294967294)")
    return first, last


def read_secret_file(name: str, path: str) -> str:
    """The secret in the file ``path`` named by variable ``name`` (one trailing newline dropped).

    The file must not be readable by group or others: a secret the children's uids could read
    is no secret. Errors name the variable and the path, never the content.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"{name} names {path!r}, which cannot be read: {exc.strerror}") from None
    if info.st_mode & 0o077:
        raise ConfigError(
            f"{name} names {path!r} with mode {info.st_mode & 0o777:04o}: it must be readable by "
            "the gateway's user alone (chmod 0400 or 0600)"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            content = handle.read(1 << 16)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name} names {path!r}, which cannot be read: {exc}") from None
    return content.removesuffix("\n").removesuffix("\r")


def resolve_secret_files(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with every ``CXG_<NAME>_FILE`` replaced by the secret it names.

    Setting both ``CXG_<NAME>`` and ``CXG_<NAME>_FILE`` is an error: which one wins would be
    a guess.
    """
    resolved = dict(environ)
    for name in SECRET_NAMES:
        file_name = f"{name}_FILE"
        path = resolved.pop(file_name, "").strip()
        if not path:
            continue
        if resolved.get(name, ""):
            raise ConfigError(f"both {name} and {file_name} are set; set only one of them")
        resolved[name] = read_secret_file(file_name, path)
    return resolved


def _parse_text(value: str) -> str:
    return value.strip()


# The parser for each kind of variable in ``VARIABLES``.
_PARSERS: dict[Any, Callable[[str], object]] = {
    Seconds: _parse_seconds,
    ByteSize: parse_byte_size,
    bool: _parse_bool,
    GoTrueOnly: _parse_go_true_only,
    LogLevel: _parse_log_level,
    int: _parse_int,
    CsvList: _parse_csv,
    UidRangeText: parse_uid_range,
    Secret: Secret,
    str: _parse_text,
}


def _read(environ: Mapping[str, str]) -> dict[str, Any]:
    """Structure every variable; an empty value means the default, as upstream."""
    values: dict[str, Any] = {}
    for var in VARIABLES:
        raw = environ.get(var.name, "")
        if raw == "":
            if var.default is None:
                values[var.name] = None
                continue
            raw = var.default
        try:
            values[var.name] = _PARSERS[var.type](raw)
        except (ValueError, TypeError) as exc:
            shown = "(value hidden)" if var.secret else repr(raw)
            reason = "" if var.secret else f": {exc}"
            raise ConfigError(f"{var.name} has an invalid value {shown}{reason}") from None
    return values


def _check_http_url(name: str, value: str, schemes: tuple[str, ...] = ("http", "https")) -> None:
    parts = urlsplit(value)
    if parts.scheme not in schemes or not parts.netloc:
        wanted = " or ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{name} must be an absolute {wanted} URL, got {value!r}")


def _group(values: Mapping[str, Any], names: tuple[str, ...], what: str) -> bool:
    """Return whether an all-or-none group is configured; raise if only part of it is."""
    present = [name for name in names if values[name]]
    if present and len(present) != len(names):
        missing = ", ".join(name for name in names if not values[name])
        raise ConfigError(f"{what} needs all of {', '.join(names)}; missing {missing}")
    return bool(present)


_LISTEN = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]*):(?P<port>\d{1,5})$")


def split_listen_addr(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``:8086`` means every interface) into a host and a port."""
    match = _LISTEN.match(value.strip())
    if match is None or int(match.group("port")) > 65535:
        raise ValueError(f"invalid listen address {value!r} (expected HOST:PORT, e.g. :8086)")
    host = match.group("host").strip("[]") or "0.0.0.0"
    return host, int(match.group("port"))


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the configuration from ``environ`` (default: the process environment)."""
    values = _read(resolve_secret_files(os.environ if environ is None else environ))

    for name in ("CXG_LISTEN_ADDR", "CXG_METRICS_LISTEN_ADDR"):
        if values[name]:
            try:
                split_listen_addr(values[name])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None

    log_format = values["CXG_LOG_FORMAT"].lower()
    if log_format not in _LOG_FORMATS:
        raise ConfigError(f"CXG_LOG_FORMAT must be json or text; got {log_format!r}")
    if values["CXG_MODEL_PROVIDER_WIRE_API"] != "responses":
        raise ConfigError(
            "CXG_MODEL_PROVIDER_WIRE_API must be 'responses' (the only wire API codex supports); "
            f"got {values['CXG_MODEL_PROVIDER_WIRE_API']!r}"
        )
    for name in ("CXG_MODEL_PROVIDER", "CXG_MODEL", "CXG_MODEL_PROVIDER_ENV_KEY"):
        if not values[name]:
            raise ConfigError(f"{name} must not be empty")
    if values["CXG_WS_MAX_MESSAGE_SIZE"] < 1024:
        raise ConfigError(
            "CXG_WS_MAX_MESSAGE_SIZE must be at least 1KiB; "
            f"got {values['CXG_WS_MAX_MESSAGE_SIZE']}"
        )
    if values["CXG_WS_INFLIGHT_BUDGET"] < values["CXG_WS_MAX_MESSAGE_SIZE"]:
        raise ConfigError(
            "CXG_WS_INFLIGHT_BUDGET must be at least CXG_WS_MAX_MESSAGE_SIZE "
            f"({values['CXG_WS_MAX_MESSAGE_SIZE']} bytes), or no message of that size could pass; "
            f"got {values['CXG_WS_INFLIGHT_BUDGET']}"
        )
    for name in (
        "CXG_CHILD_READY_TIMEOUT",
        "CXG_DRAIN_BUDGET",
        "CXG_EXECUTOR_STARTUP_TIMEOUT",
        "CXG_IDLE_SHUTDOWN",
        "CXG_S3_TIMEOUT",
    ):
        if values[name] <= 0:
            raise ConfigError(f"{name} must be greater than zero")
    if values["CXG_RESTORE_MAX_RATIO"] < 0:
        raise ConfigError(
            f"CXG_RESTORE_MAX_RATIO must be 0 (off) or more; got {values['CXG_RESTORE_MAX_RATIO']}"
        )

    isolation = values["CXG_CHILD_ISOLATION"].lower()
    if isolation not in _ISOLATION_MODES:
        raise ConfigError(f"CXG_CHILD_ISOLATION must be auto, required or off; got {isolation!r}")

    executor_layout = values["CXG_EXECUTOR_MCP_LAYOUT"].strip().lower()
    if executor_layout not in _EXECUTOR_LAYOUTS:
        raise ConfigError(
            "CXG_EXECUTOR_MCP_LAYOUT must be multiplexed or per-executor; "
            f"got {values['CXG_EXECUTOR_MCP_LAYOUT']!r}"
        )

    policy = _policy_settings(values)

    agentserver = None
    if _group(
        values,
        ("CXG_AGENTSERVER_INTERNAL_URL", "CXG_AGENTSERVER_INTERNAL_SECRET"),
        "The agentserver token verifier",
    ):
        _check_http_url("CXG_AGENTSERVER_INTERNAL_URL", values["CXG_AGENTSERVER_INTERNAL_URL"])
        agentserver = AgentserverSettings(
            internal_url=values["CXG_AGENTSERVER_INTERNAL_URL"].rstrip("/"),
            internal_secret=values["CXG_AGENTSERVER_INTERNAL_SECRET"],
        )

    s3 = None
    if values["CXG_S3_ENDPOINT"] and not values["CXG_S3_BUCKET"]:
        raise ConfigError("CXG_S3_ENDPOINT is set but CXG_S3_BUCKET is not; set the bucket too")
    if values["CXG_S3_BUCKET"]:
        endpoint = values["CXG_S3_ENDPOINT"]
        if endpoint:
            scheme = urlsplit(endpoint).scheme
            if scheme not in ("http", "https"):
                raise ConfigError(
                    f"CXG_S3_ENDPOINT must use http:// or https:// scheme, got {endpoint!r}"
                )
        s3 = S3Settings(
            bucket=values["CXG_S3_BUCKET"],
            endpoint=endpoint,
            region=values["CXG_S3_REGION"],
            access_key_id=values["CXG_S3_ACCESS_KEY_ID"],
            secret_access_key=values["CXG_S3_SECRET_ACCESS_KEY"],
            path_style=values["CXG_S3_PATH_STYLE"],
            timeout=values["CXG_S3_TIMEOUT"],
            allow_unfenced=values["CXG_S3_ALLOW_UNFENCED"],
        )

    exec_gateway = None
    if _group(
        values,
        (
            "CXG_EXEC_GATEWAY_URL",
            "CXG_EXEC_GATEWAY_INTERNAL_URL",
            "CXG_EXEC_GATEWAY_INTERNAL_SECRET",
            "CXG_CAPTOKEN_HMAC_SECRET",
        ),
        "The exec gateway",
    ):
        _check_http_url("CXG_EXEC_GATEWAY_URL", values["CXG_EXEC_GATEWAY_URL"], ("ws", "wss"))
        _check_http_url("CXG_EXEC_GATEWAY_INTERNAL_URL", values["CXG_EXEC_GATEWAY_INTERNAL_URL"])
        exec_gateway = ExecGatewaySettings(
            ws_url=values["CXG_EXEC_GATEWAY_URL"].rstrip("/"),
            internal_url=values["CXG_EXEC_GATEWAY_INTERNAL_URL"].rstrip("/"),
            internal_secret=values["CXG_EXEC_GATEWAY_INTERNAL_SECRET"],
            captoken_secret=values["CXG_CAPTOKEN_HMAC_SECRET"],
            captoken_ttl=values["CXG_CAPTOKEN_TTL"],
            startup_timeout=values["CXG_EXECUTOR_STARTUP_TIMEOUT"],
            layout=executor_layout,
        )

    replicas = _replica_settings(values, has_s3=s3 is not None)

    return Config(
        listen_addr=values["CXG_LISTEN_ADDR"],
        codex_bin=values["CXG_CODEX_BIN"],
        tmp_root=values["CXG_TMP_ROOT"],
        idle_shutdown=values["CXG_IDLE_SHUTDOWN"],
        log_level=values["CXG_LOG_LEVEL"],
        log_format=log_format,
        inbound_hmac_secret=values["CXG_INBOUND_HMAC_SECRET"],
        agentserver=agentserver,
        allow_hmac_tokens=values["CXG_ALLOW_HMAC_TOKENS"],
        s3=s3,
        local_store_dir=values["CXG_LOCAL_STORE_DIR"],
        exec_gateway=exec_gateway,
        captoken_ttl=values["CXG_CAPTOKEN_TTL"],
        model=ModelSettings(
            provider=values["CXG_MODEL_PROVIDER"],
            model=values["CXG_MODEL"],
            base_url=values["CXG_MODEL_PROVIDER_BASE_URL"],
            wire_api=values["CXG_MODEL_PROVIDER_WIRE_API"],
            static_api_key=values["CXG_CODEX_API_KEY"],
            token_refresh_interval=values["CXG_MODEL_TOKEN_REFRESH_INTERVAL"],
        ),
        project_trusted_paths=values["CXG_PROJECT_TRUSTED_PATHS"] or ("/tmp",),
        checkpoint_interval=values["CXG_CHECKPOINT_INTERVAL"],
        max_sessions=values["CXG_MAX_SESSIONS"],
        ws_max_message_size=values["CXG_WS_MAX_MESSAGE_SIZE"],
        ws_ping_interval=values["CXG_WS_PING_INTERVAL"],
        ws_inflight_budget=values["CXG_WS_INFLIGHT_BUDGET"],
        max_clients_per_workspace=values["CXG_MAX_CLIENTS_PER_WORKSPACE"],
        child_ready_timeout=values["CXG_CHILD_READY_TIMEOUT"],
        child_stop_grace=values["CXG_CHILD_STOP_GRACE"],
        drain_budget=values["CXG_DRAIN_BUDGET"],
        admin_secret=values["CXG_ADMIN_SECRET"],
        allowed_origins=values["CXG_ALLOWED_ORIGINS"],
        restore_limits=RestoreLimits(
            max_total_bytes=values["CXG_RESTORE_MAX_BYTES"],
            max_entries=values["CXG_RESTORE_MAX_ENTRIES"],
            max_ratio=values["CXG_RESTORE_MAX_RATIO"],
        ),
        metrics_listen_addr=values["CXG_METRICS_LISTEN_ADDR"],
        child_isolation=isolation,
        child_uid_range=values["CXG_CHILD_UID_RANGE"],
        policy=policy,
        replicas=replicas,
    )


# A pod name is part of object keys and log lines: what Kubernetes allows for a pod name.
_POD_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
# Below this, one slow store round trip could make a live owner look dead.
_MIN_TAKEOVER_SECONDS = 5.0


def _bracket_ipv6(address: str) -> str:
    """``fd00::1:8087`` (what ``$(POD_IP):8087`` gives on an IPv6 pod) as ``[fd00::1]:8087``.

    Only when everything before the last colon is an IPv6 address; anything else is left for
    the usual ``HOST:PORT`` check.
    """
    host, _, port = address.rpartition(":")
    if address.startswith("[") or host.count(":") < 2 or not port.isdigit():
        return address
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return address
    return f"[{host}]:{port}"


def _replica_settings(values: Mapping[str, Any], *, has_s3: bool) -> ReplicaSettings | None:
    """Replica mode's settings, or ``None`` when ``CXG_PEER_ADDR`` is unset."""
    peer_addr = values["CXG_PEER_ADDR"]
    if not peer_addr:
        return None
    peer_addr = _bracket_ipv6(peer_addr.strip())
    match = _LISTEN.match(peer_addr)
    if match is None or not match.group("host").strip("[]") or int(match.group("port")) > 65535:
        raise ConfigError(
            "CXG_PEER_ADDR must be the HOST:PORT other replicas reach this one at "
            f"(e.g. $(POD_IP):8087), got {peer_addr!r}"
        )
    try:
        split_listen_addr(values["CXG_PEER_LISTEN_ADDR"])
    except ValueError as exc:
        raise ConfigError(f"CXG_PEER_LISTEN_ADDR: {exc}") from None
    if not has_s3:
        raise ConfigError(
            "CXG_PEER_ADDR (replica mode) needs the S3 store: set CXG_S3_BUCKET; the local "
            "directory store is one pod's disk"
        )
    secret = values["CXG_PEER_SECRET"]
    if not secret:
        raise ConfigError(
            "CXG_PEER_ADDR (replica mode) needs CXG_PEER_SECRET, the same on every replica"
        )
    pod_name = values["CXG_POD_NAME"] or socket.gethostname()
    if not _POD_NAME.fullmatch(pod_name):
        raise ConfigError(
            f"CXG_POD_NAME must be a Kubernetes pod name (lower-case letters, digits, '-' and "
            f"'.'), got {pod_name!r}"
        )
    takeover = values["CXG_OWNER_TAKEOVER_AFTER"]
    if takeover < _MIN_TAKEOVER_SECONDS:
        raise ConfigError(
            f"CXG_OWNER_TAKEOVER_AFTER must be at least {_MIN_TAKEOVER_SECONDS:g}s, got "
            f"{takeover:g}s"
        )
    return ReplicaSettings(
        pod_name=pod_name,
        peer_addr=peer_addr,
        peer_listen_addr=values["CXG_PEER_LISTEN_ADDR"],
        peer_secret=secret,
        takeover_after=takeover,
    )


def _policy_settings(values: Mapping[str, Any]) -> PolicySettings:
    sandbox = values["CXG_POLICY_MAX_SANDBOX"]
    if sandbox not in SANDBOX_MODES:
        raise ConfigError(
            f"CXG_POLICY_MAX_SANDBOX must be one of {', '.join(SANDBOX_MODES)}; got {sandbox!r}"
        )
    approvals = values["CXG_POLICY_APPROVAL_POLICIES"]
    unknown = [name for name in approvals if name not in APPROVAL_POLICIES]
    if unknown or not approvals:
        raise ConfigError(
            "CXG_POLICY_APPROVAL_POLICIES must list some of "
            f"{', '.join(APPROVAL_POLICIES)}; got {','.join(approvals)!r}"
        )
    fs_access = values["CXG_POLICY_FS"]
    if fs_access not in FS_ACCESS:
        raise ConfigError(f"CXG_POLICY_FS must be home, off or any; got {fs_access!r}")
    return PolicySettings(
        max_sandbox=sandbox,
        approval_policies=approvals,
        fs_access=fs_access,
        allow_shell_command=values["CXG_POLICY_ALLOW_SHELL_COMMAND"],
        deny_methods=values["CXG_POLICY_DENY_METHODS"],
        extra_methods=values["CXG_POLICY_EXTRA_METHODS"],
    )


def require_authenticator(config: Config) -> None:
    """Refuse to serve without any way to authenticate clients, naming what to set."""
    if config.agentserver is None and not config.inbound_hmac_secret:
        raise ConfigError(
            "no authenticator configured: set CXG_AGENTSERVER_INTERNAL_URL and "
            "CXG_AGENTSERVER_INTERNAL_SECRET (production) or CXG_INBOUND_HMAC_SECRET (development)"
        )
