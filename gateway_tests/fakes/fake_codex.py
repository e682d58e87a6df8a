"""A fake `codex` binary: `codex --version` and `codex app-server`, for the gateway's tests.

Run as ``python fake_codex.py ARGS…`` (normally through the ``codex`` launcher beside this file
or a per-test launcher from :mod:`gateway_tests.fakes.launchers`). It reproduces the observable
contract of the real codex 0.169.0 app-server that the gateway depends on, without any model,
sandbox or SQLite:

* command line: ``codex [-c k=v]… app-server --listen URL [--ws-auth capability-token
  (--ws-token-sha256 HEX | --ws-token-file ABS_PATH)]`` with the real error texts and exit codes
  (usage errors exit 2, runtime failures exit 1);
* ``ws://IP:PORT`` listener (port 0 gives an ephemeral port) with the real stderr banner,
  ``/readyz`` and ``/healthz``, 403 for any request carrying ``Origin``, 401 with a short text body
  for a missing or wrong capability token, WebSocket upgrades on any other path, no
  permessage-deflate, a 128 MiB message limit, a bounded outbound queue per connection;
* ``stdio://`` (JSON lines on stdin/stdout; stdin EOF ends the process);
* the JSON-RPC-lite protocol: ``initialize``/``initialized``, ``thread/start``, ``thread/resume``,
  ``thread/list``, ``thread/read``, ``thread/loaded/list``, ``thread/unsubscribe``,
  ``turn/start`` (streamed fake answer, rollout JSONL under ``CODEX_HOME/sessions``),
  ``turn/interrupt``, ``account/read``, ``config/read``, ``model/list``, and the rest of what the
  real TUI calls at start-up and in a plain conversation (``configRequirements/read``,
  ``account/bedrock/checkGovCloudRequirements``, ``hooks/list``, ``skills/list``,
  ``collaborationMode/list``, ``plugin/installed``, ``experimentalFeature/list``,
  ``permissionProfile/list``, ``thread/search``, ``thread/turns/list``, ``thread/goal/get``,
  ``thread/backgroundTerminals/list``, ``thread/settings/update``, ``thread/readState/update``)
  with empty but schema-valid answers; notifications go only to connections subscribed to the
  thread. ``gateway_tests/test_codex_contract.py`` runs the same checks against this fake and
  the real binary, validating these answers against the real binary's generated JSON schema;
* drain on the first SIGTERM/SIGINT/SIGHUP (ws mode), immediate exit on the second SIGTERM/SIGINT.

Scripted prompts (the text of a ``turn/start`` input containing the marker):
``__slow__`` long stream, ``__fail__`` failed turn, ``__crash__`` exit 3 mid-turn,
``__flood__`` many deltas as fast as possible, ``__env__`` reports which credential variables are
set (booleans only, never values), ``__approval__`` asks the client for a command approval.

Deviations from the real codex, on purpose (test-only extras):

* ``fake/echo`` ``{"payload": ANY}`` → ``{"payload": ANY}`` (lets tests push large text frames);
* ``fake/close`` ``{"code": N, "reason": S}`` → replies ``{}`` then closes that connection with
  that close code and reason;
* ``fake/pid`` → ``{"pid": os.getpid()}``;
* with ``FAKE_CODEX_ECHO_BINARY=1`` binary frames are echoed back byte for byte (the real server
  drops them);
* every connection closed by the peer is appended to ``CODEX_HOME/fake-codex-closes.jsonl`` as
  ``{"code": N, "reason": S}`` (code 1006 when the TCP connection ended without a Close frame),
  and logged to stderr as ``fake-codex: peer closed connection N code=… reason=…``;
* ``CODEX_HOME/fake-codex-start.json`` (pid, argv, listen URL, credential presence booleans,
  ``env_names``: the names of the environment variables it was given, see
  :func:`given_env_names`) and ``CODEX_HOME/fake-codex-exit.json`` (reason, signal
  count, open turns) are written for tests to assert on;
* the rollout file is created at ``thread/start`` (the real one waits for the first turn);
* a method it does not implement gets -32601 "<method> is not supported by the fake codex"
  (the real one answers an unknown method with -32600 "Invalid request: unknown variant …").

Knobs (environment; the gateway passes an allow-listed environment to its child, so tests set
them in a per-test launcher script):

``FAKE_CODEX_EXIT_AT_START=N``    print an error and exit with status N immediately;
``FAKE_CODEX_DELTA_MS``           pause between agent-message deltas (default 10);
``FAKE_CODEX_OUTBOUND_CAP``       outbound queue per connection (default 128); when full the
                                  connection is dropped like the real server does;
``FAKE_CODEX_ECHO_BINARY=1``      echo binary frames;
``FAKE_CODEX_IGNORE_SIGTERM=1``   ignore SIGTERM entirely (tests of SIGKILL after the grace);
``FAKE_CODEX_SLOW_DELTAS`` / ``FAKE_CODEX_SLOW_DELTA_MS``
                                  shape of ``__slow__`` (default 100 deltas, 100 ms apart);
``FAKE_CODEX_FLOOD_DELTAS``       number of deltas of ``__flood__`` (default 5000).

Messages over 128 MiB close the connection with 1009.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import signal
import sys
import time
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

VERSION = "0.0.0-fake"
USER_AGENT = f"codex_cli_rs/{VERSION} (fake)"
DEFAULT_MAX_MESSAGE = 128 * 1024 * 1024
MAX_HTTP_HEAD = 64 * 1024
# Provider ids the real codex reserves for its built-in providers.
BUILTIN_PROVIDERS: dict[str, dict[str, Any]] = {
    "openai": {"name": "OpenAI", "requires_openai_auth": True},
    "ollama": {"name": "Ollama"},
    "lmstudio": {"name": "LM Studio"},
    "amazon-bedrock": {"name": "Amazon Bedrock"},
}
SANDBOX_OBJECTS: dict[str, dict[str, Any]] = {
    "read-only": {"type": "readOnly", "networkAccess": False},
    "workspace-write": {
        "type": "workspaceWrite",
        "writableRoots": [],
        "networkAccess": False,
        "excludeTmpdirEnvVar": False,
        "excludeSlashTmp": False,
    },
    "danger-full-access": {"type": "dangerFullAccess"},
}
APP_SERVER_USAGE = "Usage: codex app-server [OPTIONS] [COMMAND]"
ROOT_USAGE = "Usage: codex [OPTIONS] [PROMPT]\n       codex [OPTIONS] <COMMAND> [ARGS]"


# --------------------------------------------------------------------------------------------
# small helpers


def log(message: str) -> None:
    """One plain line on stderr (stdout is reserved for the protocol in stdio mode)."""
    try:
        sys.stderr.write(f"fake-codex: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr closed by the parent: logging must never kill the server


def die(status: int, message: str) -> NoReturn:
    """Print `message` to stderr and exit with `status`."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
    sys.exit(status)


def usage_error(message: str, usage: str = APP_SERVER_USAGE) -> NoReturn:
    """A clap-shaped usage error: exit 2 with the usage line on stderr."""
    die(2, f"error: {message}\n\n{usage}\n\nFor more information, try '--help'.")


def env_int(name: str, default: int) -> int:
    """An integer knob from the environment; a bad value is a startup error, not a silent 0."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        die(1, f"Error: {name} must be an integer, got {raw!r}")


def env_flag(name: str) -> bool:
    """A boolean knob: set to 1/true/yes."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def utc_stamp() -> str:
    """Timestamp format of rollout records (UTC, milliseconds, trailing Z)."""
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def uuid7() -> str:
    """A time-ordered UUIDv7, like the thread ids of the real codex."""
    ms = time.time_ns() // 1_000_000
    rand_a = secrets.randbits(12)
    rand_b = secrets.randbits(62)
    value = ((ms & ((1 << 48) - 1)) << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return str(uuid.UUID(int=value))


def given_env_names() -> list[str]:
    """Names of the environment variables the caller gave the fake (values never recorded).

    Leaves out what the launch itself adds: the ``FAKE_CODEX_*`` knobs, ``PWD`` (every sh
    exports it) and ``LC_CTYPE`` when Python's C-locale coercion invented it (the launchers say
    whether it was given, in ``FAKE_CODEX_LC_CTYPE_GIVEN``).
    """
    names = {n for n in os.environ if not n.startswith("FAKE_CODEX_") and n != "PWD"}
    if os.environ.get("FAKE_CODEX_LC_CTYPE_GIVEN") == "":
        names.discard("LC_CTYPE")
    return sorted(names)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write a JSON file via rename so a reader never sees half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def dumps(message: Any) -> str:
    """Compact JSON like the real server (serde_json), UTF-8 not escaped."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False)


class RpcError(Exception):
    """An error answer to a request."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        """The `error` member of the response."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


def invalid_request(message: str, data: Any = None) -> RpcError:
    """Error -32600, the code the real server uses for most request-level failures."""
    return RpcError(-32600, message, data)


# --------------------------------------------------------------------------------------------
# command line and configuration


class Options:
    """Parsed command line of `codex [-c k=v]… app-server …`."""

    def __init__(self) -> None:
        self.overrides: list[str] = []
        self.listen = "stdio://"
        self.listen_given = False
        self.stdio_flag = False
        self.ws_auth: str | None = None
        self.ws_token_file: str | None = None
        self.ws_token_sha256: str | None = None
        self.ws_shared_secret_file: str | None = None
        self.jwt_flags: list[str] = []
        self.strict_config = False


def parse_args(argv: list[str]) -> Options:
    """Parse argv (without the program name) with clap-like errors; handles --version/--help."""
    opts = Options()
    i = 0

    def value_of(flag: str, usage: str) -> str:
        nonlocal i
        arg = argv[i]
        if "=" in arg and arg.startswith("--"):
            return arg.split("=", 1)[1]
        if i + 1 >= len(argv):
            usage_error(f"a value is required for '{flag}' but none was supplied", usage)
        i += 1
        return argv[i]

    # Root level: options before the subcommand.
    while i < len(argv):
        arg = argv[i]
        if arg in ("--version", "-V"):
            print(f"codex-cli {VERSION}")
            sys.exit(0)
        if arg in ("-h", "--help"):
            print(f"Fake Codex CLI for tests\n\n{ROOT_USAGE}\n\nCommands:\n  app-server")
            sys.exit(0)
        if arg in ("-c", "--config") or arg.startswith("--config="):
            opts.overrides.append(value_of("--config <key=value>", ROOT_USAGE))
        elif arg.startswith("-c") and len(arg) > 2:
            opts.overrides.append(arg[2:])
        elif arg == "app-server":
            i += 1
            break
        elif arg.startswith("-"):
            usage_error(f"unexpected argument '{arg}' found", ROOT_USAGE)
        else:
            usage_error(
                f"unrecognized subcommand '{arg}' (the fake only has app-server)", ROOT_USAGE
            )
        i += 1
    else:
        usage_error("a subcommand is required (the fake only implements app-server)", ROOT_USAGE)

    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if name in ("-h", "--help"):
            print(
                "Run the app server\n\n"
                f"{APP_SERVER_USAGE}\n\nOptions:\n"
                "      --listen <URL>  stdio:// (default), ws://IP:PORT, or off\n"
                "      --ws-auth <MODE>  capability-token\n"
                "      --ws-token-file <ABS_PATH>\n"
                "      --ws-token-sha256 <HEX>"
            )
            sys.exit(0)
        if name in ("-c", "--config"):
            opts.overrides.append(value_of("--config <key=value>", APP_SERVER_USAGE))
        elif name == "--listen":
            opts.listen = value_of("--listen <URL>", APP_SERVER_USAGE)
            opts.listen_given = True
        elif name == "--stdio":
            opts.stdio_flag = True
        elif name == "--ws-auth":
            opts.ws_auth = value_of("--ws-auth <MODE>", APP_SERVER_USAGE)
        elif name == "--ws-token-file":
            opts.ws_token_file = value_of("--ws-token-file <PATH>", APP_SERVER_USAGE)
        elif name == "--ws-token-sha256":
            opts.ws_token_sha256 = value_of("--ws-token-sha256 <HEX>", APP_SERVER_USAGE)
        elif name == "--ws-shared-secret-file":
            opts.ws_shared_secret_file = value_of(
                "--ws-shared-secret-file <PATH>", APP_SERVER_USAGE
            )
        elif name in ("--ws-issuer", "--ws-audience", "--ws-max-clock-skew-seconds"):
            value_of(name, APP_SERVER_USAGE)
            opts.jwt_flags.append(name)
        elif name == "--analytics-default-enabled":
            pass
        elif name == "--strict-config":
            opts.strict_config = True
        elif arg.startswith("-"):
            usage_error(f"unexpected argument '{arg}' found")
        else:
            usage_error(f"unrecognized subcommand '{arg}' (not implemented by the fake)")
        i += 1

    if opts.stdio_flag:
        if opts.listen_given:
            usage_error("the argument '--stdio' cannot be used with '--listen <URL>'")
        opts.listen = "stdio://"
    validate_auth_flags(opts)
    return opts


def validate_auth_flags(opts: Options) -> None:
    """Auth flag combinations, checked like the real CLI (usage errors exit 2)."""
    if opts.ws_auth is None:
        if opts.ws_token_file or opts.ws_token_sha256:
            usage_error("--ws-token-file/--ws-token-sha256 require --ws-auth capability-token")
        if opts.ws_shared_secret_file or opts.jwt_flags:
            usage_error(
                "--ws-shared-secret-file and JWT flags require --ws-auth signed-bearer-token"
            )
        return
    if opts.ws_auth == "capability-token":
        if opts.ws_shared_secret_file or opts.jwt_flags:
            usage_error("JWT flags require --ws-auth signed-bearer-token")
        if bool(opts.ws_token_file) == bool(opts.ws_token_sha256):
            usage_error(
                "--ws-auth capability-token requires exactly one of --ws-token-file "
                "or --ws-token-sha256"
            )
        if opts.ws_token_file and not os.path.isabs(opts.ws_token_file):
            usage_error(f"--ws-token-file must be an absolute path: {opts.ws_token_file}")
        if opts.ws_token_sha256 is not None:
            digest = opts.ws_token_sha256.strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                usage_error("--ws-token-sha256 must be 64 hexadecimal characters")
        return
    if opts.ws_auth == "signed-bearer-token":
        # Not needed by the gateway; refuse clearly instead of pretending to check JWTs.
        die(1, "Error: --ws-auth signed-bearer-token is not implemented by the fake codex")
    usage_error(
        f"invalid value '{opts.ws_auth}' for '--ws-auth <MODE>'\n  [possible values: "
        "capability-token, signed-bearer-token]"
    )


def parse_listen(url: str) -> tuple[str, str | None, int]:
    """Return (kind, ip, port) for a --listen URL, failing like the real CLI."""
    if url == "stdio://":
        return "stdio", None, 0
    if url == "off":
        return "off", None, 0
    if url.startswith("ws://"):
        rest = url[len("ws://") :].rstrip("/")
        try:
            if rest.startswith("["):
                host, _, port_text = rest[1:].partition("]:")
                address = ipaddress.IPv6Address(host)
            else:
                host, _, port_text = rest.rpartition(":")
                address = ipaddress.IPv4Address(host)  # type: ignore[assignment]
            port = int(port_text)
            if not 0 <= port <= 65535:
                raise ValueError(port)
        except ValueError:
            usage_error(
                f"invalid value '{url}' for '--listen <URL>': invalid websocket --listen URL "
                f"`{url}`; expected `ws://IP:PORT`"
            )
        return "ws", str(address), port
    if url.startswith("unix://"):
        usage_error(
            f"invalid value '{url}' for '--listen <URL>': unix:// is not implemented by the fake"
        )
    usage_error(
        f"invalid value '{url}' for '--listen <URL>': unsupported --listen URL `{url}`; expected "
        "`stdio://`, `unix://`, `unix://PATH`, `ws://IP:PORT`, or `off`"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    """`-c a.b=VALUE`: VALUE parsed as TOML, else taken as a plain string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        die(1, f"Error: invalid override (missing '='): {text}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [part.strip().strip('"') for part in key.split(".")], value


class Config:
    """The effective configuration: config.toml plus -c overrides, validated like the real one."""

    def __init__(self, home: Path, overrides: list[str], strict: bool) -> None:
        self.home = home
        self.warning: str | None = None
        self.data: dict[str, Any] = {}
        path = home / "config.toml"
        if path.exists():
            try:
                self.data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                if strict:
                    die(1, f"Error: failed to parse {path}: {exc}")
                log(f"invalid config.toml, using defaults: {exc}")
                self.warning = "Invalid configuration; using defaults."
        for text in overrides:
            keys, value = parse_override(text)
            node = self.data
            for key in keys[:-1]:
                child = node.get(key)
                if not isinstance(child, dict):
                    child = node[key] = {}
                node = child
            node[keys[-1]] = value

        providers = self.data.get("model_providers") or {}
        if not isinstance(providers, dict):
            die(1, "Error: `model_providers` must be a table")
        for pid, provider in providers.items():
            if pid in BUILTIN_PROVIDERS:
                die(1, f"Error: model provider id `{pid}` is reserved for a built-in provider")
            if not isinstance(provider, dict):
                die(1, f"Error: [model_providers.{pid}] must be a table")
            wire_api = provider.get("wire_api", "responses")
            if wire_api == "chat":
                die(
                    1,
                    f'Error: model_providers.{pid}: `wire_api = "chat"` is no longer supported; '
                    'use `wire_api = "responses"`',
                )
            if wire_api != "responses":
                die(1, f"Error: model_providers.{pid}: unknown wire_api `{wire_api}`")
        self.provider_id: str = str(self.data.get("model_provider", "openai"))
        all_providers = {**BUILTIN_PROVIDERS, **providers}
        if self.provider_id not in all_providers:
            die(1, f"Error: Model provider `{self.provider_id}` not found")
        self.provider: dict[str, Any] = all_providers[self.provider_id]
        env_key = self.provider.get("env_key")
        self.env_key: str | None = str(env_key) if env_key else None
        self.model: str = str(self.data.get("model", "fake-model"))
        self.approval_policy: Any = self.data.get("approval_policy", "on-request")
        self.sandbox_mode: str = str(self.data.get("sandbox_mode", "read-only"))

    def env_key_missing(self) -> bool:
        """The real server fails every model request when the provider's env_key is unset."""
        return bool(self.env_key) and not os.environ.get(self.env_key or "")

    def credential_presence(self) -> dict[str, bool]:
        """Which credential variables are set (booleans only; values never leave the process)."""
        names = ["OPENAI_API_KEY", "CODEX_API_KEY", "CODEX_ACCESS_TOKEN"]
        if self.env_key and self.env_key not in names:
            names.append(self.env_key)
        return {name: bool(os.environ.get(name)) for name in names}

    def mcp_summary(self) -> dict[str, Any]:
        """`[mcp_servers]` as seen by the server, with `env` reduced to variable names."""
        servers = self.data.get("mcp_servers") or {}
        summary: dict[str, Any] = {}
        if isinstance(servers, dict):
            for name, entry in servers.items():
                if not isinstance(entry, dict):
                    continue
                summary[name] = {
                    "command": entry.get("command"),
                    "args": entry.get("args"),
                    "url": entry.get("url"),
                    "envNames": sorted((entry.get("env") or {}).keys()),
                    "envVars": entry.get("env_vars"),
                }
        return summary


# --------------------------------------------------------------------------------------------
# threads, rollouts, turns


class Thread:
    """A loaded thread: its rollout file, metadata and subscribed connections."""

    def __init__(
        self, thread_id: str, path: Path, cwd: str, created_at: int, provider: str
    ) -> None:
        self.id = thread_id
        self.path = path
        self.cwd = cwd
        self.created_at = created_at
        self.updated_at = created_at
        self.provider = provider
        self.preview = ""
        self.subscribers: set[Connection] = set()
        self.turn: Turn | None = None
        self.turn_counter = 0

    def append(self, record_type: str, payload: dict[str, Any]) -> None:
        """Append one rollout record; opening per line keeps every line flushed on disk."""
        line = dumps({"timestamp": utc_stamp(), "type": record_type, "payload": payload})
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        self.updated_at = int(time.time())


class Turn:
    """One running turn."""

    def __init__(self, thread: Thread, turn_id: str, text: str) -> None:
        self.thread = thread
        self.id = turn_id
        self.text = text
        self.scope = trio.CancelScope()
        self.interrupted = False
        self.done = trio.Event()


def read_rollout(path: Path) -> dict[str, Any] | None:
    """Summarise a rollout file: meta, preview, turns. None when it has no session_meta."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    meta: dict[str, Any] | None = None
    turns: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line after a crash must not hide the thread
        payload = record.get("payload") or {}
        if record.get("type") == "session_meta" and meta is None:
            meta = payload
        elif record.get("type") == "event_msg" and payload.get("type") == "user_message":
            n = len(turns) + 1
            turns.append(
                {
                    "id": f"turn-{n}",
                    "status": "completed",
                    "error": None,
                    "items": [
                        {
                            "type": "userMessage",
                            "id": f"turn-{n}-user",
                            "content": [{"type": "text", "text": payload.get("message", "")}],
                        }
                    ],
                }
            )
        elif record.get("type") == "event_msg" and payload.get("type") == "agent_message" and turns:
            n = len(turns)
            turns[-1]["items"].append(
                {
                    "type": "agentMessage",
                    "id": f"turn-{n}-agent",
                    "text": payload.get("message", ""),
                }
            )
    if meta is None or "id" not in meta:
        return None
    preview = turns[0]["items"][0]["content"][0]["text"] if turns else ""
    return {"meta": meta, "preview": preview, "turns": turns}


# --------------------------------------------------------------------------------------------
# connections


class Connection:
    """One client: a WebSocket (or stdio) with its own initialize state and outbound queue."""

    counter = 0

    def __init__(self, server: Server, cap: float, writer: Callable[[Any], Any]) -> None:
        Connection.counter += 1
        self.number = Connection.counter
        self.server = server
        self.cap = cap
        # Slack above the cap so control items (close) can always be queued.
        size = cap + 8 if cap != float("inf") else cap
        self.out_send, self.out_recv = trio.open_memory_channel[Any](size)
        self.writer = writer
        self.initialized = False
        self.initialize_seen = False
        self.closing = False
        self.dead = False
        self.scope = trio.CancelScope()
        self.pending: dict[Any, trio.Event] = {}
        self.answers: dict[Any, dict[str, Any]] = {}
        # Work a handler wants done right after its response is queued (a close, a
        # notification that must follow the reply, cancelling a turn).
        self.after_response: Callable[[], None] | None = None
        self.finished = trio.Event()

    def send(self, message: dict[str, Any]) -> None:
        """Queue one outgoing message; a full queue means a slow consumer and costs the link."""
        if self.dead or self.closing:
            return
        if self.out_send.statistics().current_buffer_used >= self.cap:
            log(
                f"disconnecting slow connection {self.number} after outbound queue filled "
                f"(cap {self.cap})"
            )
            self.abort()
            return
        self.out_send.send_nowait(("text", dumps(message)))

    def send_binary(self, data: bytes) -> None:
        """Queue a binary frame (only used by the binary echo extra)."""
        if not (self.dead or self.closing):
            self.out_send.send_nowait(("bytes", data))

    def close(self, code: int, reason: str) -> None:
        """Queue a Close frame after everything already queued; further sends are dropped."""
        if self.dead or self.closing:
            return
        self.closing = True
        self.out_send.send_nowait(("close", code, reason))

    def abort(self) -> None:
        """Drop the connection without a Close frame (what the real server does to slow peers)."""
        self.dead = True
        self.scope.cancel()

    def respond(self, request_id: Any, result: Any) -> None:
        """Send a success response."""
        self.send({"id": request_id, "result": result})

    def respond_error(self, request_id: Any, error: RpcError) -> None:
        """Send an error response."""
        self.send({"id": request_id, "error": error.to_json()})


# --------------------------------------------------------------------------------------------
# the server


class Server:
    """Protocol state shared by all connections: threads, turns, drain."""

    def __init__(self, opts: Options, home: Path, config: Config, listen: str) -> None:
        self.opts = opts
        self.home = home
        self.config = config
        self.listen = listen
        self.sessions = home / "sessions"
        self.threads: dict[str, Thread] = {}
        self.connections: set[Connection] = set()
        self.turns: dict[str, Turn] = {}
        self.draining = False
        self.signals = 0
        self.nursery: trio.Nursery | None = None
        self.delta_s = env_int("FAKE_CODEX_DELTA_MS", 10) / 1000
        self.slow_deltas = env_int("FAKE_CODEX_SLOW_DELTAS", 100)
        self.slow_delta_s = env_int("FAKE_CODEX_SLOW_DELTA_MS", 100) / 1000
        self.flood_deltas = env_int("FAKE_CODEX_FLOOD_DELTAS", 5000)
        self.echo_binary = env_flag("FAKE_CODEX_ECHO_BINARY")
        self.outbound_cap = env_int("FAKE_CODEX_OUTBOUND_CAP", 128)
        self.max_message = DEFAULT_MAX_MESSAGE
        self.server_request_ids = 0

    # ---- bookkeeping files ------------------------------------------------------------------

    def write_start_file(self) -> None:
        """fake-codex-start.json: what the process was started with (no secret values)."""
        presence = self.config.credential_presence()
        write_json_atomic(
            self.home / "fake-codex-start.json",
            {
                "pid": os.getpid(),
                "argv": sys.argv,
                "listen": self.listen,
                "requestedListen": self.opts.listen,
                "codexHome": str(self.home),
                "cwd": os.getcwd(),
                "modelProvider": self.config.provider_id,
                "providerEnvKey": self.config.env_key,
                "providerEnvKeySet": bool(self.config.env_key)
                and presence.get(self.config.env_key or "", False),
                "OPENAI_API_KEY": presence["OPENAI_API_KEY"],
                "CODEX_API_KEY": presence["CODEX_API_KEY"],
                "CODEX_ACCESS_TOKEN": presence["CODEX_ACCESS_TOKEN"],
                "envSet": presence,
                "authJson": (self.home / "auth.json").exists(),
                "mcpServers": self.config.mcp_summary(),
                "configOverrides": [o.split("=", 1)[0] for o in self.opts.overrides],
                "env_names": given_env_names(),
                "knobs": sorted(n for n in os.environ if n.startswith("FAKE_CODEX_")),
            },
        )

    def write_exit_file(self, reason: str) -> None:
        """fake-codex-exit.json: which shutdown path was taken."""
        try:
            write_json_atomic(
                self.home / "fake-codex-exit.json",
                {
                    "pid": os.getpid(),
                    "reason": reason,
                    "signals": self.signals,
                    "openTurns": sorted(self.turns),
                },
            )
        except OSError as exc:
            log(f"could not write fake-codex-exit.json: {exc}")

    def record_peer_close(self, conn: Connection, code: int, reason: str) -> None:
        """Append a peer-initiated close to fake-codex-closes.jsonl, then say so on stderr."""
        try:
            with (self.home / "fake-codex-closes.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(dumps({"code": code, "reason": reason}) + "\n")
        except OSError as exc:
            log(f"could not record close: {exc}")
        log(f"peer closed connection {conn.number} code={code} reason={reason!r}")

    # ---- dispatch ---------------------------------------------------------------------------

    def handle_text(self, conn: Connection, text: str) -> None:
        """One inbound text message: invalid JSON is logged and dropped, like the real server."""
        try:
            message = json.loads(text)
        except ValueError:
            log(f"connection {conn.number}: dropping invalid JSON message")
            return
        if not isinstance(message, dict):
            log(f"connection {conn.number}: dropping non-object message")
            return
        method = message.get("method")
        if method is None:
            # A response to one of our server→client requests.
            request_id = message.get("id")
            event = conn.pending.pop(request_id, None)
            if event is not None:
                conn.answers[request_id] = message
                event.set()
            return
        if "id" not in message:
            self.handle_notification(conn, str(method))
            return
        request_id = message["id"]
        params = message.get("params") or {}
        try:
            if not isinstance(params, dict):
                raise RpcError(-32602, "params must be an object")
            result = self.handle_request(conn, str(method), params)
        except RpcError as error:
            conn.respond_error(request_id, error)
            return
        if result is not None:
            conn.respond(request_id, result)
        after, conn.after_response = conn.after_response, None
        if after is not None:
            after()

    def handle_notification(self, conn: Connection, method: str) -> None:
        """`initialized` completes the handshake; other notifications are ignored."""
        if method == "initialized" and conn.initialize_seen and not conn.initialized:
            conn.initialized = True
            if self.config.warning:
                conn.send(
                    {
                        "method": "configWarning",
                        "params": {"summary": self.config.warning, "details": None},
                    }
                )

    def handle_request(self, conn: Connection, method: str, params: dict[str, Any]) -> Any:
        """Answer one request (or raise RpcError)."""
        if method == "initialize":
            if conn.initialize_seen:
                raise invalid_request("Already initialized")
            conn.initialize_seen = True
            return {
                "userAgent": USER_AGENT,
                "codexHome": str(self.home),
                "platformFamily": "unix",
                "platformOs": "linux",
            }
        if method == "fake/pid":
            return {"pid": os.getpid()}
        if not conn.initialize_seen:
            raise invalid_request("Not initialized")
        handler = self.methods.get(method)
        if handler is None:
            log(f"connection {conn.number}: {method} is not supported by the fake")
            raise RpcError(-32601, f"{method} is not supported by the fake codex")
        return handler(self, conn, params)

    # ---- test-only extras -------------------------------------------------------------------

    def m_fake_echo(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {"payload": params.get("payload")}

    def m_fake_close(self, conn: Connection, params: dict[str, Any]) -> Any:
        code = params.get("code", 1000)
        reason = params.get("reason", "")
        if not isinstance(code, int) or not (
            (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999
        ):
            raise RpcError(-32602, f"invalid close code: {code!r}")
        if not isinstance(reason, str) or len(reason.encode()) > 123:
            raise RpcError(-32602, "reason must be a string of at most 123 bytes")
        # Close after the `{}` reply has been queued, so the client sees both in order.
        conn.after_response = lambda: conn.close(code, reason)
        return {}

    # ---- threads ----------------------------------------------------------------------------

    def thread_json(
        self, thread_id: str, info: dict[str, Any], include_turns: bool
    ) -> dict[str, Any]:
        """The v2 Thread object."""
        loaded = self.threads.get(thread_id)
        if loaded is None:
            status: dict[str, Any] = {"type": "notLoaded"}
        elif loaded.turn is not None:
            status = {"type": "active", "activeFlags": []}
        else:
            status = {"type": "idle"}
        return {
            "id": thread_id,
            "sessionId": thread_id,
            "preview": info.get("preview", ""),
            "ephemeral": False,
            "modelProvider": info.get("provider", self.config.provider_id),
            "createdAt": info.get("createdAt", 0),
            "updatedAt": info.get("updatedAt", 0),
            "status": status,
            "path": info.get("path"),
            "cwd": info.get("cwd", ""),
            "cliVersion": VERSION,
            "source": "vscode",
            "gitInfo": None,
            "name": None,
            "forkedFromId": None,
            "projectId": None,
            "turns": info.get("turns", []) if include_turns else [],
        }

    def loaded_info(self, thread: Thread, include_turns: bool) -> dict[str, Any]:
        """Info dict for a loaded thread (turns rebuilt from the rollout when asked)."""
        info: dict[str, Any] = {
            "preview": thread.preview,
            "provider": thread.provider,
            "createdAt": thread.created_at,
            "updatedAt": thread.updated_at,
            "path": str(thread.path),
            "cwd": thread.cwd,
        }
        if include_turns:
            summary = read_rollout(thread.path)
            info["turns"] = summary["turns"] if summary else []
        return info

    def disk_info(self, path: Path) -> tuple[str, dict[str, Any]] | None:
        """(thread id, info dict) for a rollout file on disk."""
        summary = read_rollout(path)
        if summary is None:
            return None
        meta = summary["meta"]
        try:
            mtime = int(path.stat().st_mtime)
        except OSError:
            mtime = 0
        created = int(meta.get("createdAt") or mtime)
        return str(meta["id"]), {
            "preview": summary["preview"],
            "provider": meta.get("model_provider", self.config.provider_id),
            "createdAt": created,
            "updatedAt": max(mtime, created),
            "path": str(path),
            "cwd": meta.get("cwd", ""),
            "turns": summary["turns"],
        }

    def rollout_files(self) -> list[Path]:
        """All rollout files, newest first (the file name starts with the local timestamp)."""
        if not self.sessions.is_dir():
            return []
        files = list(self.sessions.glob("*/*/*/rollout-*.jsonl"))
        files.sort(
            key=lambda p: p.name[len("rollout-") : len("rollout-") + 19] + p.name, reverse=True
        )
        return files

    def find_rollout(self, thread_id: str) -> Path | None:
        """The rollout file of a thread id, if any."""
        for path in self.sessions.glob(f"*/*/*/rollout-*-{thread_id}.jsonl"):
            return path
        return None

    def start_response(self, thread: Thread, params: dict[str, Any]) -> dict[str, Any]:
        """Result shape shared by thread/start and thread/resume."""
        sandbox_mode = str(params.get("sandbox") or self.config.sandbox_mode)
        return {
            "thread": self.thread_json(thread.id, self.loaded_info(thread, True), True),
            "model": params.get("model") or self.config.model,
            "modelProvider": thread.provider,
            "serviceTier": None,
            "cwd": thread.cwd,
            "instructionSources": [],
            "approvalPolicy": params.get("approvalPolicy") or self.config.approval_policy,
            "approvalsReviewer": "user",
            "sandbox": SANDBOX_OBJECTS.get(sandbox_mode, {"type": sandbox_mode}),
            "reasoningEffort": None,
        }

    def parse_thread_id(self, params: dict[str, Any]) -> str:
        """`threadId` validated as a UUID (the real server rejects anything else)."""
        raw = params.get("threadId")
        try:
            return str(uuid.UUID(str(raw)))
        except ValueError:
            raise invalid_request(f"invalid thread id: {raw!r}") from None

    def m_thread_start(self, conn: Connection, params: dict[str, Any]) -> Any:
        cwd = str(params.get("cwd") or os.getcwd())
        thread_id = uuid7()
        now = _dt.datetime.now().astimezone()
        directory = self.sessions / now.strftime("%Y") / now.strftime("%m") / now.strftime("%d")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"rollout-{now.strftime('%Y-%m-%dT%H-%M-%S')}-{thread_id}.jsonl"
        provider = str(params.get("modelProvider") or self.config.provider_id)
        thread = Thread(thread_id, path, cwd, int(now.timestamp()), provider)
        thread.append(
            "session_meta",
            {
                "id": thread_id,
                "timestamp": utc_stamp(),
                "createdAt": thread.created_at,
                "cwd": cwd,
                "originator": "codex_cli_rs",
                "cli_version": VERSION,
                "source": "vscode",
                "model_provider": provider,
            },
        )
        self.threads[thread_id] = thread
        thread.subscribers.add(conn)
        self.maybe_trust_project(cwd, str(params.get("sandbox") or self.config.sandbox_mode))
        result = self.start_response(thread, params)
        conn.after_response = lambda: self.notify(
            thread, "thread/started", {"thread": result["thread"]}
        )
        log(f"thread {thread_id} started")
        return result

    def maybe_trust_project(self, cwd: str, sandbox_mode: str) -> None:
        """Like the real server, record a writable-sandbox project as trusted in config.toml."""
        if sandbox_mode not in ("workspace-write", "danger-full-access"):
            return
        projects = self.config.data.get("projects") or {}
        if isinstance(projects, dict) and cwd in projects:
            return
        path = self.home / "config.toml"
        try:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(f'\n[projects.{json.dumps(cwd)}]\ntrust_level = "trusted"\n')
        except OSError as exc:
            log(f"could not record trusted project in config.toml: {exc}")
            return
        self.config.data.setdefault("projects", {})[cwd] = {"trust_level": "trusted"}

    def m_thread_resume(self, conn: Connection, params: dict[str, Any]) -> Any:
        thread_id = self.parse_thread_id(params)
        thread = self.threads.get(thread_id)
        if thread is None:
            path = self.find_rollout(thread_id)
            found = self.disk_info(path) if path else None
            if path is None or found is None:
                raise invalid_request(f"no rollout found for thread id {thread_id}")
            _, info = found
            thread = Thread(thread_id, path, info["cwd"], info["createdAt"], info["provider"])
            thread.preview = info["preview"]
            thread.turn_counter = len(info["turns"])
            self.threads[thread_id] = thread
        thread.subscribers.add(conn)
        return self.start_response(thread, params)

    def m_thread_unsubscribe(self, conn: Connection, params: dict[str, Any]) -> Any:
        thread = self.threads.get(self.parse_thread_id(params))
        if thread is None or conn not in thread.subscribers:
            return {"status": "notSubscribed"}
        thread.subscribers.discard(conn)
        return {"status": "unsubscribed"}

    def m_thread_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        limit = params.get("limit") or 25
        cursor = params.get("cursor")
        try:
            start = int(str(cursor).removeprefix("fake:")) if cursor else 0
            limit = max(1, int(limit))
        except ValueError:
            raise RpcError(-32602, f"invalid cursor: {cursor!r}") from None
        entries = []
        for path in self.rollout_files():
            found = self.disk_info(path)
            if found is not None:
                entries.append(found)
        if params.get("sortKey") == "updated_at":
            entries.sort(key=lambda e: e[1]["updatedAt"], reverse=True)
        page = entries[start : start + limit]
        more = start + limit < len(entries)
        return {
            "data": [self.thread_json(tid, info, False) for tid, info in page],
            "nextCursor": f"fake:{start + limit}" if more else None,
            "backwardsCursor": None,
            "readStates": {},
        }

    def m_thread_read(self, conn: Connection, params: dict[str, Any]) -> Any:
        thread_id = self.parse_thread_id(params)
        include = bool(params.get("includeTurns"))
        thread = self.threads.get(thread_id)
        if thread is not None:
            return {
                "thread": self.thread_json(thread_id, self.loaded_info(thread, include), include)
            }
        path = self.find_rollout(thread_id)
        found = self.disk_info(path) if path else None
        if found is None:
            raise invalid_request(f"thread not found: {thread_id}")
        return {"thread": self.thread_json(thread_id, found[1], include)}

    def m_thread_loaded_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {"data": sorted(self.threads), "nextCursor": None}

    # ---- account, config, models ------------------------------------------------------------

    def m_account_read(self, conn: Connection, params: dict[str, Any]) -> Any:
        account = None
        auth = self.home / "auth.json"
        if auth.exists():
            try:
                data = json.loads(auth.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}
            if isinstance(data, dict) and data.get("tokens"):
                account = {"type": "chatgpt", "email": None, "planType": None}
            elif isinstance(data, dict) and data.get("OPENAI_API_KEY"):
                account = {"type": "apiKey"}
        requires = bool(self.config.provider.get("requires_openai_auth", False))
        return {
            "account": account,
            "userId": None,
            "requiresOpenaiAuth": requires,
            "workspaceRouting": None,
        }

    def m_config_read(self, conn: Connection, params: dict[str, Any]) -> Any:
        # A small static view: the real answer carries the whole config, but config.toml may
        # hold tokens in [mcp_servers.*.env] and the fake has no reason to echo them.
        return {
            "config": {
                "model": self.config.model,
                "model_provider": self.config.provider_id,
                "approval_policy": self.config.approval_policy,
                "sandbox_mode": self.config.sandbox_mode,
            },
            "origins": {},
        }

    def m_model_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {
            "data": [
                {
                    "id": self.config.model,
                    "model": self.config.model,
                    "displayName": "Fake model",
                    "description": "Answers with canned text; no network.",
                    "supportedReasoningEfforts": [
                        {"reasoningEffort": "medium", "description": "The only effort it has"}
                    ],
                    "defaultReasoningEffort": "medium",
                    "isDefault": True,
                    "hidden": False,
                }
            ],
            "nextCursor": None,
        }

    # ---- what the real TUI asks for at start-up: empty but well-formed answers -------------
    # Shapes follow `codex app-server generate-json-schema --experimental` of 0.169.0 (the
    # contract tests validate each answer against it).

    def m_config_requirements_read(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {"requirements": None, "supportsIndependentSpeedModes": False}

    def m_bedrock_gov_cloud(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {"isGovCloud": False, "shouldWarn": False}

    def m_hooks_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {
            "data": [
                {"cwd": cwd, "hooks": [], "warnings": [], "errors": []} for cwd in self.cwds(params)
            ]
        }

    def m_skills_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {"data": [{"cwd": cwd, "skills": [], "errors": []} for cwd in self.cwds(params)]}

    def cwds(self, params: dict[str, Any]) -> list[str]:
        """The directories a per-cwd listing is asked about (the server's cwd by default)."""
        given = params.get("cwds")
        if isinstance(given, list) and given:
            return [str(cwd) for cwd in given]
        return [os.getcwd()]

    def m_collaboration_mode_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {
            "data": [
                {"name": "Plan", "mode": "plan", "model": None, "reasoning_effort": "medium"},
                {"name": "Default", "mode": "default", "model": None, "reasoning_effort": None},
            ]
        }

    def m_plugin_installed(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {"marketplaces": [], "marketplaceLoadErrors": []}

    def m_experimental_feature_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {"data": [], "nextCursor": None}

    def m_permission_profile_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        return {
            "data": [
                {"id": profile, "description": None, "allowed": True}
                for profile in (":read-only", ":workspace", ":danger-full-access")
            ],
            "nextCursor": None,
        }

    def m_thread_goal_get(self, conn: Connection, params: dict[str, Any]) -> Any:
        self.parse_thread_id(params)
        return {"goal": None}

    def m_thread_background_terminals_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        self.parse_thread_id(params)
        return {"data": [], "nextCursor": None}

    def m_thread_settings_update(self, conn: Connection, params: dict[str, Any]) -> Any:
        self.parse_thread_id(params)
        return {}

    def m_thread_turns_list(self, conn: Connection, params: dict[str, Any]) -> Any:
        thread_id = self.parse_thread_id(params)
        path = self.find_rollout(thread_id)
        summary = read_rollout(path) if path else None
        if summary is None:
            raise invalid_request(f"thread not found: {thread_id}")
        if not summary["turns"]:
            # Like the real server: nothing to list before the first user message.
            raise invalid_request(
                f"thread {thread_id} is not materialized yet; thread/turns/list is unavailable "
                "before first user message"
            )
        turns = summary["turns"]
        if params.get("sortDirection") == "desc":
            turns = list(reversed(turns))
        return {"data": turns, "nextCursor": None, "backwardsCursor": None}

    def m_thread_read_state_update(self, conn: Connection, params: dict[str, Any]) -> Any:
        self.parse_thread_id(params)
        operation = params.get("operation")
        if not isinstance(operation, dict) or operation.get("type") not in ("read", "unread"):
            raise invalid_request("Invalid request: missing field `operation`")
        return {"readState": {"firstUnread": None, "revision": "fake-0"}}

    def m_thread_search(self, conn: Connection, params: dict[str, Any]) -> Any:
        term = params.get("searchTerm")
        if not isinstance(term, str):
            raise invalid_request("Invalid request: missing field `searchTerm`")
        found = []
        for path in self.rollout_files():
            entry = self.disk_info(path)
            if entry is not None and term.lower() in entry[1]["preview"].lower():
                found.append(self.thread_json(entry[0], entry[1], False))
        return {"data": found, "nextCursor": None, "backwardsCursor": None}

    # ---- turns ------------------------------------------------------------------------------

    def notify(self, thread: Thread, method: str, params: dict[str, Any]) -> None:
        """Send a notification to every connection subscribed to `thread`."""
        message = {"method": method, "params": params}
        for conn in list(thread.subscribers):
            conn.send(message)

    def m_turn_start(self, conn: Connection, params: dict[str, Any]) -> Any:
        if self.draining:
            raise invalid_request(
                "Server is draining; retry after reconnecting", {"reason": "serverShuttingDown"}
            )
        thread_id = self.parse_thread_id(params)
        thread = self.threads.get(thread_id)
        if thread is None:
            raise invalid_request(f"thread not found: {thread_id}")
        if thread.turn is not None:
            raise invalid_request(f"thread {thread_id} already has a turn in progress")
        inputs = params.get("input")
        if not isinstance(inputs, list):
            raise RpcError(-32602, "input must be a list")
        text = "\n".join(
            str(item.get("text", ""))
            for item in inputs
            if isinstance(item, dict) and item.get("type") == "text"
        )
        thread.turn_counter += 1
        turn = Turn(thread, f"turn-{thread.turn_counter}", text)
        thread.turn = turn
        self.turns[turn.id + "@" + thread.id] = turn
        assert self.nursery is not None
        self.nursery.start_soon(self.run_turn, turn)
        return {"turn": {"id": turn.id, "status": "inProgress", "items": [], "error": None}}

    def m_turn_interrupt(self, conn: Connection, params: dict[str, Any]) -> Any:
        thread = self.threads.get(self.parse_thread_id(params))
        turn = thread.turn if thread else None
        if turn is None or (params.get("turnId") and params.get("turnId") != turn.id):
            raise invalid_request("no active turn to interrupt")
        turn.interrupted = True
        conn.after_response = turn.scope.cancel
        return {}

    async def run_turn(self, turn: Turn) -> None:
        """Stream a scripted answer for `turn` to the thread's subscribers."""
        thread = turn.thread
        base = {"threadId": thread.id, "turnId": turn.id}
        turn_json: dict[str, Any] = {
            "id": turn.id,
            "status": "inProgress",
            "items": [],
            "error": None,
        }
        agent_id = f"{turn.id}-agent"
        agent_text: list[str] = []
        status = "completed"
        error: dict[str, Any] | None = None
        try:
            self.notify(
                thread,
                "thread/status/changed",
                {"threadId": thread.id, "status": {"type": "active", "activeFlags": []}},
            )
            self.notify(thread, "turn/started", {"threadId": thread.id, "turn": turn_json})
            user_item = {
                "type": "userMessage",
                "id": f"{turn.id}-user",
                "content": [{"type": "text", "text": turn.text, "text_elements": []}],
            }
            self.notify(thread, "item/started", {**base, "item": user_item})
            thread.append("event_msg", {"type": "user_message", "message": turn.text, "images": []})
            thread.append(
                "response_item",
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": turn.text}],
                },
            )
            if not thread.preview:
                thread.preview = turn.text
            self.notify(thread, "item/completed", {**base, "item": user_item})

            with turn.scope:
                error = await self.turn_body(turn, base, agent_id, agent_text)
            if turn.scope.cancelled_caught or turn.interrupted:
                status = "interrupted"
            elif error is not None:
                status = "failed"
            if agent_text:  # the agent item was started
                self.notify(
                    thread,
                    "item/completed",
                    {
                        **base,
                        "item": {
                            "type": "agentMessage",
                            "id": agent_id,
                            "text": "".join(agent_text),
                        },
                    },
                )
                thread.append(
                    "event_msg", {"type": "agent_message", "message": "".join(agent_text)}
                )
                thread.append(
                    "response_item",
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "".join(agent_text)}],
                    },
                )
            if status == "interrupted":
                thread.append("event_msg", {"type": "turn_aborted", "reason": "interrupted"})
            usage = {
                "totalTokens": 30 + len(agent_text),
                "inputTokens": 30,
                "cachedInputTokens": 0,
                "outputTokens": len(agent_text),
                "reasoningOutputTokens": 0,
            }
            self.notify(
                thread,
                "thread/tokenUsage/updated",
                {
                    **base,
                    "tokenUsage": {"total": usage, "last": usage, "modelContextWindow": 200000},
                },
            )
        finally:
            thread.turn = None
            self.turns.pop(turn.id + "@" + thread.id, None)
            done = {**turn_json, "status": status, "error": error}
            self.notify(thread, "turn/completed", {"threadId": thread.id, "turn": done})
            self.notify(
                thread, "thread/status/changed", {"threadId": thread.id, "status": {"type": "idle"}}
            )
            turn.done.set()
            log(f"turn {turn.id} of thread {thread.id} {status}")

    async def turn_body(
        self, turn: Turn, base: dict[str, Any], agent_id: str, agent_text: list[str]
    ) -> dict[str, Any] | None:
        """The scripted part of a turn; returns an error object for a failed turn."""
        thread = turn.thread
        text = turn.text
        if self.config.env_key_missing() and "__env__" not in text:
            return self.fail(
                thread,
                base,
                f"Missing environment variable: `{self.config.env_key}`.",
            )
        if "__fail__" in text:
            return self.fail(thread, base, "fake failure requested by __fail__")
        if "__approval__" in text:
            decision = await self.ask_approval(turn, base)
            words = [f"Approval decision: {decision}."]
        elif "__env__" in text:
            presence = self.config.credential_presence()
            words = [f"{name}={'set' if ok else 'unset'} " for name, ok in presence.items()]
        elif "__flood__" in text:
            words = [f"flood {i} " for i in range(self.flood_deltas)]
        elif "__slow__" in text:
            words = [f"slow {i} " for i in range(self.slow_deltas)]
        else:
            words = ["This ", "is ", "a ", "fake ", "answer ", "to: ", text]
        self.notify(
            thread,
            "item/started",
            {**base, "item": {"type": "agentMessage", "id": agent_id, "text": ""}},
        )
        agent_text.append("")  # marks "agent item started" even before the first delta
        delay = self.slow_delta_s if "__slow__" in text else self.delta_s
        for index, word in enumerate(words):
            if "__flood__" in text:
                # No pause: only yield so the writers can run, as a fast model stream would.
                await trio.lowlevel.checkpoint()
            elif index:
                await trio.sleep(delay)
            self.notify(
                thread, "item/agentMessage/delta", {**base, "itemId": agent_id, "delta": word}
            )
            agent_text.append(word)
            if "__crash__" in text and index == 1:
                log("crashing mid-turn as requested by __crash__ (exit 3)")
                os._exit(3)
        return None

    def fail(self, thread: Thread, base: dict[str, Any], message: str) -> dict[str, Any]:
        """Emit the `error` notification of a failed turn and return the turn's error object."""
        error = {"message": message, "codexErrorInfo": None, "additionalDetails": None}
        self.notify(thread, "error", {**base, "error": error, "willRetry": False})
        thread.append("event_msg", {"type": "error", "message": message})
        return error

    async def ask_approval(self, turn: Turn, base: dict[str, Any]) -> str:
        """Send a command approval request to the subscribers; the first answer decides."""
        self.server_request_ids += 1
        request_id = self.server_request_ids
        answered = trio.Event()
        answer: dict[str, Any] = {}
        waiting: list[tuple[Connection, trio.Event]] = []
        assert self.nursery is not None

        async def relay(conn: Connection, event: trio.Event) -> None:
            await event.wait()
            if not answered.is_set():
                answer.update(conn.answers.pop(request_id, {}))
                answered.set()

        for conn in list(turn.thread.subscribers):
            event = trio.Event()
            conn.pending[request_id] = event
            waiting.append((conn, event))
            self.nursery.start_soon(relay, conn, event)
            conn.send(
                {
                    "id": request_id,
                    "method": "item/commandExecution/requestApproval",
                    "params": {
                        **base,
                        "itemId": f"{turn.id}-cmd",
                        "reason": "fake approval requested by __approval__",
                        "command": "echo fake",
                        "cwd": turn.thread.cwd,
                    },
                }
            )
        try:
            if waiting:
                await answered.wait()
        finally:
            for conn, event in waiting:
                conn.pending.pop(request_id, None)
                event.set()  # lets the relay tasks end
            self.notify(
                turn.thread,
                "serverRequest/resolved",
                {"threadId": turn.thread.id, "requestId": request_id},
            )
        return str((answer.get("result") or {}).get("decision", "cancel"))

    methods: dict[str, Callable[[Server, Connection, dict[str, Any]], Any]] = {
        "fake/echo": m_fake_echo,
        "fake/close": m_fake_close,
        "thread/start": m_thread_start,
        "thread/resume": m_thread_resume,
        "thread/unsubscribe": m_thread_unsubscribe,
        "thread/list": m_thread_list,
        "thread/read": m_thread_read,
        "thread/loaded/list": m_thread_loaded_list,
        "turn/start": m_turn_start,
        "turn/interrupt": m_turn_interrupt,
        "account/read": m_account_read,
        "config/read": m_config_read,
        "model/list": m_model_list,
        "configRequirements/read": m_config_requirements_read,
        "account/bedrock/checkGovCloudRequirements": m_bedrock_gov_cloud,
        "hooks/list": m_hooks_list,
        "skills/list": m_skills_list,
        "collaborationMode/list": m_collaboration_mode_list,
        "plugin/installed": m_plugin_installed,
        "experimentalFeature/list": m_experimental_feature_list,
        "permissionProfile/list": m_permission_profile_list,
        "thread/goal/get": m_thread_goal_get,
        "thread/backgroundTerminals/list": m_thread_background_terminals_list,
        "thread/settings/update": m_thread_settings_update,
        "thread/search": m_thread_search,
        "thread/turns/list": m_thread_turns_list,
        "thread/readState/update": m_thread_read_state_update,
    }

    def forget(self, conn: Connection) -> None:
        """Drop a finished connection from every subscriber set."""
        self.connections.discard(conn)
        conn.finished.set()
        for thread in self.threads.values():
            thread.subscribers.discard(conn)
        for event in conn.pending.values():
            event.set()  # an unanswered approval counts as "cancel"
        conn.pending.clear()

    # ---- shutdown ---------------------------------------------------------------------------

    async def watch_signals(self, cancel: trio.CancelScope) -> None:
        """First SIGTERM/SIGINT/SIGHUP drains; a second SIGTERM/SIGINT exits at once."""
        wanted = {signal.SIGINT, signal.SIGHUP}
        if not env_flag("FAKE_CODEX_IGNORE_SIGTERM"):
            wanted.add(signal.SIGTERM)
        with trio.open_signal_receiver(*wanted) as signals:
            async for signum in signals:
                self.signals += 1
                name = signal.Signals(signum).name
                if not self.draining:
                    log(
                        f"received {name}: draining (waiting for {len(self.turns)} running turn(s))"
                    )
                    self.draining = True
                    assert self.nursery is not None
                    self.nursery.start_soon(self.drain, cancel)
                elif signum != signal.SIGHUP:
                    log(f"received second {name}: exiting now")
                    self.write_exit_file("forced")
                    os._exit(0)

    async def drain(self, cancel: trio.CancelScope) -> None:
        """Wait for running turns, close every connection with 1001, then end the process."""
        while self.turns:
            await next(iter(self.turns.values())).done.wait()
        log("no running turns; closing connections")
        for conn in list(self.connections):
            conn.close(1001, "server shutting down")
        with trio.move_on_after(5):
            for conn in list(self.connections):
                await conn.finished.wait()
        self.write_exit_file("drained")
        log("drained; exiting")
        cancel.cancel()


# --------------------------------------------------------------------------------------------
# WebSocket / HTTP transport


async def http_response(stream: trio.SocketStream, status: int, text: str, body: str = "") -> None:
    """A plain HTTP/1.1 response followed by closing the connection."""
    data = body.encode()
    head = f"HTTP/1.1 {status} {text}\r\ncontent-length: {len(data)}\r\nconnection: close\r\n"
    if data:
        head += "content-type: text/plain; charset=utf-8\r\n"
    with trio.move_on_after(5):
        await stream.send_all(head.encode() + b"\r\n" + data)


async def read_head(
    stream: trio.SocketStream,
) -> tuple[str, str, list[tuple[str, str]], bytes] | None:
    """Read one HTTP request head: (method, target, headers, bytes after the head)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HTTP_HEAD:
            return None
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers.append((name.strip().lower(), value.strip()))
    return parts[0], parts[1], headers, rest


class WebSocketServer:
    """HTTP + WebSocket on one TCP port, by hand with wsproto (no permessage-deflate)."""

    def __init__(self, server: Server, token_sha256: str | None) -> None:
        self.server = server
        self.token_sha256 = token_sha256

    def check_auth(self, headers: list[tuple[str, str]]) -> str | None:
        """None when the upgrade may proceed, else the 401 body."""
        if self.token_sha256 is None:
            return None
        values = [v for n, v in headers if n == "authorization"]
        if not values:
            return "missing websocket bearer token"
        scheme, _, token = values[0].partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing websocket bearer token"
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if not hmac.compare_digest(digest, self.token_sha256):
            return "invalid websocket bearer token"
        return None

    async def handle(self, stream: trio.SocketStream) -> None:
        """One TCP connection: a plain HTTP request or a WebSocket session."""
        gone = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)
        try:
            await self._handle(stream)
        except gone:
            pass
        except BaseExceptionGroup as group:
            # A peer that resets the connection mid-frame surfaces from the reader's nursery.
            _, rest = group.split(gone)
            if rest is not None:
                raise rest from None
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(30) as head_scope:
            parsed = await read_head(stream)
        if head_scope.cancelled_caught or parsed is None:
            if parsed is None and not head_scope.cancelled_caught:
                await http_response(stream, 400, "Bad Request", "malformed request")
            return
        method, target, headers, rest = parsed
        names = {name for name, _ in headers}
        path = target.split("?", 1)[0]
        if "origin" in names:
            await http_response(stream, 403, "Forbidden")
            return
        if method == "GET" and path in ("/readyz", "/healthz"):
            await http_response(stream, 200, "OK")
            return
        connection_tokens = {
            token.strip().lower() for n, v in headers if n == "connection" for token in v.split(",")
        }
        upgrade = {v.strip().lower() for n, v in headers if n == "upgrade"}
        if "upgrade" not in connection_tokens:
            await http_response(
                stream, 400, "Bad Request", "Connection header did not include 'upgrade'"
            )
            return
        if "websocket" not in upgrade or method != "GET":
            await http_response(stream, 400, "Bad Request", "not a websocket upgrade")
            return
        denial = self.check_auth(headers)
        if denial is not None:
            log(f"rejecting websocket upgrade: {denial}")
            await http_response(stream, 401, "Unauthorized", denial)
            return
        ws = WSConnection(ConnectionType.SERVER)
        ws.initiate_upgrade_connection([(n.encode(), v.encode()) for n, v in headers], target)
        if not any(isinstance(event, Request) for event in ws.events()):
            await http_response(stream, 400, "Bad Request", "invalid websocket upgrade")
            return
        # No extensions offered back: permessage-deflate is never negotiated.
        await stream.send_all(ws.send(AcceptConnection(extensions=[])))
        await self.session(stream, ws, rest)

    async def session(self, stream: trio.SocketStream, ws: WSConnection, rest: bytes) -> None:
        """Run one WebSocket connection until either side closes it."""
        server = self.server
        lock = trio.Lock()

        async def write(item: Any) -> bool:
            """Send one queued item; False once our Close frame has gone out."""
            async with lock:
                if ws.state is not ConnectionState.OPEN:
                    return False
                if item[0] in ("text", "bytes"):
                    await stream.send_all(ws.send(Message(data=item[1])))
                else:
                    await stream.send_all(ws.send(CloseConnection(code=item[1], reason=item[2])))
                    return False
            return True

        conn = Connection(server, server.outbound_cap, write)
        server.connections.add(conn)
        log(f"websocket connection {conn.number} opened")
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.writer, conn, nursery)
                    await self.reader(stream, ws, conn, lock, rest)
                    nursery.cancel_scope.cancel()
        finally:
            server.forget(conn)
            log(f"websocket connection {conn.number} finished")

    async def writer(self, conn: Connection, nursery: trio.Nursery) -> None:
        """Drain the outbound queue; after our Close frame, give the peer 5 s to answer."""
        async for item in conn.out_recv:
            if not await conn.writer(item):
                break
        await trio.sleep(5)
        nursery.cancel_scope.cancel()

    async def reader(
        self,
        stream: trio.SocketStream,
        ws: WSConnection,
        conn: Connection,
        lock: trio.Lock,
        rest: bytes,
    ) -> None:
        """Read frames, reassemble messages, dispatch them; returns when the connection ends."""
        server = self.server
        parts: list[Any] = []
        size = 0
        data = rest
        while True:
            if data:
                ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, (TextMessage, BytesMessage)):
                    parts.append(event.data)
                    size += len(event.data)
                    if size > server.max_message:
                        log(f"connection {conn.number}: message over {server.max_message} bytes")
                        conn.close(1009, "message too big")
                        parts, size = [], 0
                        continue
                    if not event.message_finished:
                        continue
                    if isinstance(event, TextMessage):
                        message: Any = "".join(parts)
                    else:
                        message = b"".join(parts)
                    parts, size = [], 0
                    if conn.closing:
                        continue
                    if isinstance(message, str):
                        server.handle_text(conn, message)
                    elif server.echo_binary:
                        conn.send_binary(message)
                    else:
                        log(
                            f"connection {conn.number}: dropping a binary frame "
                            f"({len(message)} bytes)"
                        )
                elif isinstance(event, Ping):
                    async with lock:
                        if ws.state is ConnectionState.OPEN:
                            await stream.send_all(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    if ws.state is ConnectionState.REMOTE_CLOSING:
                        # The peer started the close: record it and answer with 1000, as the
                        # real server does (it does not echo the peer's code).
                        conn.closing = True
                        server.record_peer_close(conn, event.code, event.reason or "")
                        async with lock:
                            await stream.send_all(ws.send(CloseConnection(code=1000)))
                    elif ws.state is ConnectionState.OPEN:
                        # wsproto reports a protocol error (bad UTF-8, bad framing) this way,
                        # with the close code to use; the connection cannot go on.
                        log(f"connection {conn.number}: protocol error: {event.reason}")
                        conn.closing = True
                        async with lock:
                            await stream.send_all(
                                ws.send(CloseConnection(event.code, event.reason))
                            )
                    return
            data = await stream.receive_some(256 * 1024)
            if not data:
                if ws.state is ConnectionState.OPEN and not conn.closing:
                    server.record_peer_close(conn, 1006, "")
                return


# --------------------------------------------------------------------------------------------
# stdio transport


async def serve_stdio(server: Server) -> None:
    """JSON lines on stdin/stdout; one connection; stdin EOF ends the process."""
    stdout = trio.lowlevel.FdStream(os.dup(1))
    stdin = trio.lowlevel.FdStream(os.dup(0))

    async def write(item: Any) -> bool:
        if item[0] == "text":
            await stdout.send_all(item[1].encode() + b"\n")
        return True

    # stdio is never disconnected for being slow (the real server blocks instead).
    conn = Connection(server, float("inf"), write)
    server.connections.add(conn)

    writer_done = trio.Event()

    async def writer() -> None:
        async for item in conn.out_recv:
            await conn.writer(item)
        writer_done.set()

    async with trio.open_nursery() as nursery:
        server.nursery = nursery
        nursery.start_soon(writer)
        buffer = b""
        while True:
            chunk = await stdin.receive_some(256 * 1024)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                if line.strip():
                    server.handle_text(conn, line.decode("utf-8", "replace"))
        # stdin EOF: stop producing, let the queued answers go out, then leave.
        conn.dead = True
        conn.out_send.close()
        with trio.move_on_after(5):
            await writer_done.wait()
        server.write_exit_file("stdinEof")
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------
# main


async def serve_ws(server: Server, ip: str, port: int, token_sha256: str | None) -> None:
    """Bind, print the banner, serve until drained."""
    listeners = await trio.open_tcp_listeners(port, host=ip)
    bound = listeners[0].socket.getsockname()
    host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    address = f"{host}:{bound[1]}"
    server.listen = f"ws://{address}"
    server.write_start_file()  # again, now with the bound port
    loopback = ipaddress.ip_address(bound[0]).is_loopback
    note = (
        "binds localhost only (use SSH port-forwarding for remote access)"
        if loopback
        else "binds a non-loopback address; clients must present the configured credentials"
    )
    ws_server = WebSocketServer(server, token_sha256)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            server.nursery = nursery
            nursery.start_soon(server.watch_signals, scope)
            await nursery.start(trio.serve_listeners, ws_server.handle, listeners)
            sys.stderr.write(
                "codex app-server (WebSockets)\n"
                f"  listening on: ws://{address}\n"
                f"  readyz: http://{address}/readyz\n"
                f"  healthz: http://{address}/healthz\n"
                f"  note: {note}\n"
            )
            sys.stderr.flush()


def main(argv: list[str]) -> int:
    """Entry point: parse, validate, start; returns the exit status."""
    opts = parse_args(argv)
    exit_at_start = env_int("FAKE_CODEX_EXIT_AT_START", 0)
    if exit_at_start:
        die(exit_at_start, f"Error: fake codex told to fail at start (status {exit_at_start})")
    kind, ip, port = parse_listen(opts.listen)

    home_env = os.environ.get("CODEX_HOME")
    home = Path(home_env) if home_env else Path.home() / ".codex"
    if home_env and not home.is_dir():
        die(1, f'Error: CODEX_HOME points to "{home}", but that path does not exist')
    home.mkdir(parents=True, exist_ok=True)
    config = Config(home, opts.overrides, opts.strict_config)
    if kind == "off":
        die(1, "Error: no transport configured; use --listen or enable remote control")

    token_sha256: str | None = None
    if opts.ws_token_sha256:
        token_sha256 = opts.ws_token_sha256.strip().lower()
    elif opts.ws_token_file:
        try:
            token = Path(opts.ws_token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            die(1, f"Error: failed to read --ws-token-file {opts.ws_token_file}: {exc}")
        if not token:
            die(1, f"Error: --ws-token-file {opts.ws_token_file} is empty")
        token_sha256 = hashlib.sha256(token.encode()).hexdigest()
    if kind == "ws" and ip and not ipaddress.ip_address(ip).is_loopback and opts.ws_auth is None:
        die(1, f"Error: refusing to listen on non-loopback address {ip} without --ws-auth")

    (home / "sessions").mkdir(exist_ok=True)
    server = Server(opts, home, config, opts.listen)
    server.write_start_file()

    if env_flag("FAKE_CODEX_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if kind == "stdio":
        # Default dispositions in stdio mode, like the real server (no graceful handler).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        trio.run(serve_stdio, server)
        return 0
    assert ip is not None
    trio.run(serve_ws, server, ip, port, token_sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
