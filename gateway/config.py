"""The daemon's configuration: every ``CXG_*`` variable, parsed and validated once at start.

Variables keep the Go service's names, defaults and meaning (``docs/configuration.md`` lists
them all). Values are structured into frozen attrs classes by a cattrs converter whose hooks
understand Go durations, byte sizes, comma lists and secrets. Any bad value raises
``ConfigError`` with one sentence naming the variable and the offending value — except for
secrets, whose values are never echoed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, NewType, TypeVar
from urllib.parse import urlsplit

import attrs
import cattrs

from gateway.durations import parse_byte_size, parse_go_duration

Seconds = NewType("Seconds", float)
ByteSize = NewType("ByteSize", int)
CsvList = NewType("CsvList", tuple[str, ...])


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


@attrs.frozen
class ModelSettings:
    """The model provider block rendered into each session's config.toml."""

    provider: str
    model: str
    base_url: str
    env_key: str
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
    child_ready_timeout: float
    child_stop_grace: float
    drain_budget: float
    admin_secret: Secret | None
    allowed_origins: tuple[str, ...]
    restore_limits: RestoreLimits
    metrics_listen_addr: str | None


@attrs.frozen
class _Var:
    """One environment variable: its name, default and the type cattrs structures it into."""

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
    _Var("CXG_LOG_LEVEL", "info", str),
    _Var("CXG_LOG_FORMAT", "json", str),
    _Var("CXG_S3_ENDPOINT", None, str),
    _Var("CXG_S3_REGION", "us-east-1", str),
    _Var("CXG_S3_BUCKET", None, str),
    _Var("CXG_S3_ACCESS_KEY_ID", "", str),
    _Var("CXG_S3_SECRET_ACCESS_KEY", "", Secret, secret=True),
    _Var("CXG_S3_PATH_STYLE", "false", bool),
    _Var("CXG_S3_TIMEOUT", "5s", Seconds),
    _Var("CXG_LOCAL_STORE_DIR", "/tmp/codex-app-gateway-store", str),
    _Var("CXG_INBOUND_HMAC_SECRET", None, Secret, secret=True),
    _Var("CXG_EXEC_GATEWAY_URL", None, str),
    _Var("CXG_EXEC_GATEWAY_INTERNAL_URL", None, str),
    _Var("CXG_EXEC_GATEWAY_INTERNAL_SECRET", None, Secret, secret=True),
    _Var("CXG_CAPTOKEN_HMAC_SECRET", None, Secret, secret=True),
    _Var("CXG_EXECUTOR_STARTUP_TIMEOUT", "10s", Seconds),
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
    _Var("CXG_CHILD_READY_TIMEOUT", "60s", Seconds),
    _Var("CXG_CHILD_STOP_GRACE", "10s", Seconds),
    _Var("CXG_DRAIN_BUDGET", "30s", Seconds),
    _Var("CXG_ADMIN_SECRET", None, Secret, secret=True),
    _Var("CXG_ALLOWED_ORIGINS", "", CsvList),
    _Var("CXG_RESTORE_MAX_BYTES", "8GiB", ByteSize),
    _Var("CXG_RESTORE_MAX_ENTRIES", "200000", int),
    _Var("CXG_RESTORE_MAX_RATIO", "100", int),
    _Var("CXG_METRICS_LISTEN_ADDR", None, str),
)

_LOG_LEVELS = ("debug", "info", "warn", "warning", "error")
_LOG_FORMATS = ("json", "text")


def _structure_seconds(value: str, _: object) -> float:
    seconds = parse_go_duration(value)
    if seconds < 0:
        raise ValueError(f"negative duration {value!r}")
    return seconds


def _structure_bool(value: str, _: object) -> bool:
    # Upstream: true only for a case-insensitive "true"; we also accept the usual spellings and
    # reject anything else rather than silently reading a typo as false.
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"invalid boolean {value!r} (expected true or false)")


def _structure_int(value: str, _: object) -> int:
    number = int(value.strip())
    if number < 0:
        raise ValueError(f"negative number {value!r}")
    return number


def _structure_csv(value: str, _: object) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter()
    converter.register_structure_hook(Seconds, _structure_seconds)
    converter.register_structure_hook(ByteSize, lambda v, _: parse_byte_size(v))
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(CsvList, _structure_csv)
    converter.register_structure_hook(Secret, lambda v, _: Secret(v))
    converter.register_structure_hook(str, lambda v, _: v.strip())
    return converter


_CONVERTER = _make_converter()
T = TypeVar("T")


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
            values[var.name] = _CONVERTER.structure(raw, var.type)
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
    values = _read(os.environ if environ is None else environ)

    for name in ("CXG_LISTEN_ADDR", "CXG_METRICS_LISTEN_ADDR"):
        if values[name]:
            try:
                split_listen_addr(values[name])
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None

    level = values["CXG_LOG_LEVEL"].lower()
    if level not in _LOG_LEVELS:
        raise ConfigError(f"CXG_LOG_LEVEL must be one of debug, info, warn, error; got {level!r}")
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
        )

    return Config(
        listen_addr=values["CXG_LISTEN_ADDR"],
        codex_bin=values["CXG_CODEX_BIN"],
        tmp_root=values["CXG_TMP_ROOT"],
        idle_shutdown=values["CXG_IDLE_SHUTDOWN"],
        log_level="warn" if level == "warning" else level,
        log_format=log_format,
        inbound_hmac_secret=values["CXG_INBOUND_HMAC_SECRET"],
        agentserver=agentserver,
        s3=s3,
        local_store_dir=values["CXG_LOCAL_STORE_DIR"],
        exec_gateway=exec_gateway,
        captoken_ttl=values["CXG_CAPTOKEN_TTL"],
        model=ModelSettings(
            provider=values["CXG_MODEL_PROVIDER"],
            model=values["CXG_MODEL"],
            base_url=values["CXG_MODEL_PROVIDER_BASE_URL"],
            env_key=values["CXG_MODEL_PROVIDER_ENV_KEY"],
            wire_api=values["CXG_MODEL_PROVIDER_WIRE_API"],
            static_api_key=values["CXG_CODEX_API_KEY"],
            token_refresh_interval=values["CXG_MODEL_TOKEN_REFRESH_INTERVAL"],
        ),
        project_trusted_paths=values["CXG_PROJECT_TRUSTED_PATHS"] or ("/tmp",),
        checkpoint_interval=values["CXG_CHECKPOINT_INTERVAL"],
        max_sessions=values["CXG_MAX_SESSIONS"],
        ws_max_message_size=values["CXG_WS_MAX_MESSAGE_SIZE"],
        ws_ping_interval=values["CXG_WS_PING_INTERVAL"],
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
    )


def require_authenticator(config: Config) -> None:
    """Refuse to serve without any way to authenticate clients, naming what to set."""
    if config.agentserver is None and not config.inbound_hmac_secret:
        raise ConfigError(
            "no authenticator configured: set CXG_AGENTSERVER_INTERNAL_URL and "
            "CXG_AGENTSERVER_INTERNAL_SECRET (production) or CXG_INBOUND_HMAC_SECRET (development)"
        )
