"""A JSON-RPC connection to a ``codex exec-server`` through the exec gateway's bridge.

The bridge (``<CXG_EXEC_GATEWAY_URL>/bridge/<exe_id>``) is a WebSocket that the exec gateway
authorises with the capability token (``Authorization: Bearer``) and then relays verbatim to the
executor's ``codex exec-server``. What flows over it is what exec-server 0.169.0 speaks: one
JSON-RPC 2.0 message per text frame; the client sends ``initialize`` ``{"clientName"}`` and the
``initialized`` notification first. The server also pushes notifications (``process/output``,
``process/exited``, ``process/closed``); calls here are sequential and skip them, since
``process/read`` returns the same data.

A connection lives for one tool call: a refused or dropped bridge then costs exactly that call
a clear error, and nothing has to be redialled or shared between concurrent calls.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

log = logging.getLogger(__name__)

CLIENT_NAME = "codex-env-mcp"
CONNECT_TIMEOUT = 10.0
DISCONNECT_TIMEOUT = 2.0
# ``process/read`` answers at most ``maxBytes`` of output, base64-encoded, so frames stay small;
# the bound only stops a misbehaving peer from making this process buffer without limit.
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
_REASON_BYTES = 300


class BridgeError(Exception):
    """The executor could not be reached or the conversation with it broke; ``str`` says why."""


class BridgeRefused(BridgeError):
    """The exec gateway answered the WebSocket upgrade with an HTTP error (401/403/503…)."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        hint = {
            401: "the capability token was rejected (bad, expired or revoked)",
            403: "the capability token does not grant this executor",
            503: "the executor is not connected to the exec gateway",
        }.get(status, "unexpected answer")
        detail = f": {reason}" if reason else ""
        super().__init__(f"exec gateway refused the bridge with HTTP {status} ({hint}){detail}")


class ExecServerError(BridgeError):
    """The exec-server answered a request with a JSON-RPC error."""

    def __init__(self, method: str, code: int, message: str) -> None:
        self.method = method
        self.code = code
        self.message = message
        super().__init__(f"{method}: {message} (code={code})")


@attrs.frozen
class EnvironmentInfo:
    """What ``initialize`` tells about the executor (all optional, URIs as the server sent them)."""

    cwd_uri: str | None = None
    home_uri: str | None = None
    platform_os: str | None = None
    # The executor's own shell (``environmentInfo.shell.path``), for tools that run a script.
    shell_path: str | None = None

    @classmethod
    def from_initialize(cls, result: Mapping[str, Any]) -> EnvironmentInfo:
        info = result.get("environmentInfo")
        if not isinstance(info, Mapping):
            return cls()

        def text(key: str) -> str | None:
            value = info.get(key)
            return value if isinstance(value, str) and value else None

        shell = info.get("shell")
        shell_path = shell.get("path") if isinstance(shell, Mapping) else None
        return cls(
            cwd_uri=text("cwd"),
            home_uri=text("userHomeDir"),
            platform_os=text("platformOs"),
            shell_path=shell_path if isinstance(shell_path, str) and shell_path else None,
        )


class ExecServerClient:
    """Sequential JSON-RPC calls over one WebSocket; ids increase from 1 per connection."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._next_id = 1

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self._ws.send_message(json.dumps(message, separators=(",", ":")))
        except ConnectionClosed as exc:
            raise BridgeError(f"bridge connection closed ({_close_text(exc)})") from None

    async def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a notification (no answer expected)."""
        message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = dict(params)
        await self._send(message)

    async def call(self, method: str, params: Mapping[str, Any]) -> Any:
        """Send a request and return its ``result``; raise :class:`ExecServerError` on an error.

        Frames that are not the answer — server notifications, or the late answer to a request
        abandoned by a timeout — are skipped.
        """
        request_id = self._next_id
        self._next_id += 1
        await self._send({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        while True:
            try:
                frame = await self._ws.get_message()
            except ConnectionClosed as exc:
                raise BridgeError(f"bridge connection closed ({_close_text(exc)})") from None
            try:
                message = json.loads(frame)
            except ValueError:
                log.warning("exec-server sent a frame that is not JSON; ignored")
                continue
            if not isinstance(message, dict) or message.get("id") != request_id:
                continue
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise ExecServerError(
                    method, int(error.get("code", 0)), str(error.get("message", "unknown error"))
                )
            return message.get("result")


@contextmanager
def single_errors() -> Iterator[None]:
    """Raise the one exception of an exception group as itself.

    Trio's nurseries wrap whatever escapes them in an ``ExceptionGroup``; a tool's watcher task
    never fails, so a group holds the one ``BridgeError`` of the work, which callers catch.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _close_text(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close frame"
    return f"code {reason.code}" + (f": {reason.reason}" if reason.reason else "")


def _rejection(exc: ConnectionRejected) -> BridgeRefused:
    body = (exc.body or b"")[:_REASON_BYTES].decode("utf-8", errors="replace")
    return BridgeRefused(exc.status_code, " ".join(body.split()))


@asynccontextmanager
async def open_exec_server(
    url: str, token: str, *, connect_timeout: float = CONNECT_TIMEOUT
) -> AsyncIterator[tuple[ExecServerClient, EnvironmentInfo]]:
    """Dial the bridge with the capability token and do the exec-server handshake.

    Every failure to reach the exec-server — refused upgrade, network error, timeout, a
    handshake the server rejects — is raised as a :class:`BridgeError` with a clear message.
    """
    headers = [(b"authorization", f"Bearer {token}".encode())]
    try:
        async with open_websocket_url(
            url,
            extra_headers=headers,
            max_message_size=MAX_MESSAGE_SIZE,
            connect_timeout=connect_timeout,
            disconnect_timeout=DISCONNECT_TIMEOUT,
        ) as ws:
            client = ExecServerClient(ws)
            try:
                with trio.fail_after(connect_timeout):
                    result = await client.call("initialize", {"clientName": CLIENT_NAME})
                    await client.notify("initialized")
            except trio.TooSlowError:
                raise BridgeError(
                    f"exec-server did not answer initialize within {connect_timeout:g}s"
                ) from None
            info = EnvironmentInfo.from_initialize(result if isinstance(result, Mapping) else {})
            yield client, info
    except ConnectionRejected as exc:
        raise _rejection(exc) from None
    except DisconnectionTimeout:
        # The work is done by then; a peer slow to finish the close handshake changes nothing.
        log.debug("bridge close handshake timed out")
    except ConnectionTimeout:
        raise BridgeError(
            f"could not reach the bridge {url}: no answer within {connect_timeout:g}s"
        ) from None
    except (HandshakeError, OSError) as exc:
        raise BridgeError(f"could not reach the bridge {url}: {_network_reason(exc)}") from None


def _network_reason(exc: BaseException) -> str:
    """The underlying OS error, which trio-websocket wraps in a bare ``HandshakeError``."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return cause.strerror or str(cause)
    return type(exc).__name__
