"""The private channel between a session and its env-mcp: which executors, and a token for one.

env-mcp holds no secret. When the model lists environments or a tool call needs a bridge, it
connects to a unix socket in the session's private runtime directory (served by the session,
``gateway/sessions/executor_channel.py``), sends one request line and reads one answer line:

* ``{"op": "list"}`` → ``{"ok": true, "environments": [{"id", "description", "default_cwd",
  "is_default"}, …]}``: the executors the exec gateway lists for the workspace now;
* ``{"op": "grant", "environment_id": "<exe id>"}`` → ``{"ok": true, "bridge_url", "token"}``: a
  fresh one-executor capability token for one bridge connection;
* any refusal → ``{"ok": false, "error": "<one sentence>"}``.

One request per connection, newline-terminated UTF-8 JSON, at most ``MAX_REQUEST_BYTES``;
exactly those keys (an unknown or repeated key, a wrong type, an id with control characters is
a refusal, never a guess). Pure parsing here, shared by both ends; the socket helpers at the
bottom are the only I/O, and import nothing env-mcp's start does not already need.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import trio

# The variable naming the socket in env-mcp's environment (not a secret: the socket is guarded
# by its directory, its owner and the peer's credentials, not by knowing its name).
CHANNEL_ENV = "CXG_ENVMCP_CHANNEL"
SOCKET_NAME = "executors.sock"
MAX_REQUEST_BYTES = 1024
# A workspace has a handful of executors; the list is cut at MAX_ENVIRONMENTS.
MAX_RESPONSE_BYTES = 256 * 1024
MAX_ENVIRONMENTS = 64
MAX_ID_LENGTH = 256
ANSWER_TIMEOUT = 15.0
# sun_path holds 108 bytes; longer paths are reached through the directory's descriptor.
_SUN_PATH_MAX = 100


class ChannelError(Exception):
    """The channel refused a request or could not be used; ``str`` is one clear sentence."""


@attrs.frozen
class ListRequest:
    """Which executors the workspace has now."""


@attrs.frozen
class GrantRequest:
    """A token for one bridge connection to ``environment_id``."""

    environment_id: str


Request = ListRequest | GrantRequest


@attrs.frozen
class Environment:
    """One executor as env-mcp shows it to the model."""

    id: str
    description: str = ""
    default_cwd: str = ""
    is_default: bool = False


@attrs.frozen
class Grant:
    """What one bridge connection needs; ``token`` is valid for this executor only."""

    bridge_url: str
    token: str = attrs.field(repr=False)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ChannelError("request has a repeated key")
    return dict(pairs)


def _strict_object(raw: bytes, limit: int) -> dict[str, Any]:
    if len(raw) > limit:
        raise ChannelError(f"message larger than {limit} bytes")
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ChannelError("message is not valid UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise ChannelError("message is not a JSON object")
    return value


def check_environment_id(value: object) -> str:
    """A usable executor id, or :class:`ChannelError` saying what is wrong with it."""
    if not isinstance(value, str) or not value:
        raise ChannelError("environment_id must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise ChannelError(f"environment_id is longer than {MAX_ID_LENGTH} characters")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in value):
        raise ChannelError("environment_id contains control characters")
    return value


def parse_request(raw: bytes) -> Request:
    """Decode one request line (without its newline); :class:`ChannelError` on anything else."""
    message = _strict_object(raw, MAX_REQUEST_BYTES)
    op = message.get("op")
    if op == "list" and message.keys() == {"op"}:
        return ListRequest()
    if op == "grant" and message.keys() == {"op", "environment_id"}:
        return GrantRequest(check_environment_id(message["environment_id"]))
    if op in ("list", "grant"):
        raise ChannelError(f"unexpected keys for {op}: {sorted(message)}")
    raise ChannelError("op must be 'list' or 'grant'")


def encode_request(request: Request) -> bytes:
    """The request line env-mcp sends."""
    if isinstance(request, GrantRequest):
        body: dict[str, Any] = {"op": "grant", "environment_id": request.environment_id}
    else:
        body = {"op": "list"}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def encode_environments(environments: Sequence[Environment]) -> bytes:
    """The answer to ``list``."""
    items = [attrs.asdict(env) for env in environments[:MAX_ENVIRONMENTS]]
    return _line({"ok": True, "environments": items})


def encode_grant(grant: Grant) -> bytes:
    """The answer to ``grant``."""
    return _line({"ok": True, "bridge_url": grant.bridge_url, "token": grant.token})


def encode_refusal(reason: str) -> bytes:
    """A refusal; ``reason`` is one sentence for the model (never a secret)."""
    return _line({"ok": False, "error": reason[:500]})


def _line(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _answer(raw: bytes) -> dict[str, Any]:
    message = _strict_object(raw, MAX_RESPONSE_BYTES)
    if message.get("ok") is True:
        return message
    error = message.get("error")
    raise ChannelError(error if isinstance(error, str) and error else "the session refused")


def parse_environments(raw: bytes) -> list[Environment]:
    """Decode the answer to ``list`` (raises the session's refusal as :class:`ChannelError`)."""
    items = _answer(raw).get("environments")
    if not isinstance(items, list):
        raise ChannelError("the session's answer has no environment list")
    environments = []
    for item in items[:MAX_ENVIRONMENTS]:
        if not isinstance(item, dict):
            raise ChannelError("the session's environment list is malformed")
        fields = {
            "id": check_environment_id(item.get("id")),
            "description": item.get("description", ""),
            "default_cwd": item.get("default_cwd", ""),
            "is_default": item.get("is_default", False),
        }
        if not (
            isinstance(fields["description"], str)
            and isinstance(fields["default_cwd"], str)
            and isinstance(fields["is_default"], bool)
        ):
            raise ChannelError("the session's environment list is malformed")
        environments.append(Environment(**fields))
    return environments


def parse_grant(raw: bytes) -> Grant:
    """Decode the answer to ``grant`` (raises the session's refusal as :class:`ChannelError`)."""
    message = _answer(raw)
    bridge_url, token = message.get("bridge_url"), message.get("token")
    if not isinstance(bridge_url, str) or not isinstance(token, str) or not token:
        raise ChannelError("the session's grant is malformed")
    return Grant(bridge_url=bridge_url, token=token)


# -- the socket (both ends) ----------------------------------------------------------------------


def reachable_path(path: str, directory_fd: int | None) -> str:
    """``path`` as ``bind``/``connect`` can take it: through ``/proc/self/fd`` when too long."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX or directory_fd is None:
        return path
    return f"/proc/self/fd/{directory_fd}/{os.path.basename(path)}"


class _DirectoryHandle:
    """An ``O_PATH`` descriptor of the socket's directory, held while binding or connecting."""

    def __init__(self, path: str) -> None:
        self.fd: int | None = None
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            self.fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)

    def __enter__(self) -> int | None:
        return self.fd

    def __exit__(self, *_: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


async def bind_unix_socket(path: str) -> trio.socket.SocketType:
    """A listening unix socket at ``path`` (a stale file there is replaced)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _DirectoryHandle(path) as fd:
            target = reachable_path(path, fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            await sock.bind(target)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    return sock


async def ask(path: str, request: Request) -> bytes:
    """Send ``request`` to the session at ``path``; return its answer line (without newline)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = trio.SocketStream(sock)
    try:
        with trio.fail_after(ANSWER_TIMEOUT):
            try:
                with _DirectoryHandle(path) as fd:
                    await sock.connect(reachable_path(path, fd))
            except OSError as exc:
                raise ChannelError(
                    f"cannot reach the session's executor channel: {exc.strerror or exc}"
                ) from None
            # The session may have answered (a refusal) and closed already: read it anyway.
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(encode_request(request))
            answer = bytearray()
            while b"\n" not in answer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ChannelError("the session closed the executor channel without answering")
                answer += chunk
                if len(answer) > MAX_RESPONSE_BYTES + 1:
                    raise ChannelError("the session's answer is too large")
    except trio.TooSlowError:
        raise ChannelError(f"the session did not answer within {ANSWER_TIMEOUT:g}s") from None
    except trio.BrokenResourceError:
        raise ChannelError("the session closed the executor channel") from None
    finally:
        await stream.aclose()
    return bytes(answer.split(b"\n", 1)[0])
