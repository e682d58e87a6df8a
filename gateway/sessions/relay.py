"""One attached client: its own connection to the child and a verbatim frame relay both ways.

``ClientRelay.run`` is started in the session's nursery (``nursery.start``): it connects to the
child, accepts the client's WebSocket, reports started, then pumps frames until either side
closes or the session stops it. Text stays text, binary stays binary, close codes and reasons
cross over. Whatever happens to this one client, the session and its other clients go on:
nothing raised here after start reaches the session's nursery.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
import trio

from gateway import metrics
from gateway.policy import ClientPolicy, Refusal
from gateway.sessions.child_socket import ChildClosed, ChildSocket, open_child_socket

log = structlog.get_logger(__name__)

AsgiReceive = Callable[[], Awaitable[dict[str, Any]]]
AsgiSend = Callable[[dict[str, Any]], Awaitable[None]]

CHILD_CONNECT_TIMEOUT = 10.0
CHILD_DISCONNECT_TIMEOUT = 2.0
CLIENT_CLOSE_TIMEOUT = 2.0
# Codes a peer may put in a close frame (RFC 6455 §7.4); 1005/1006/1015 are reserved for
# "no code"/"abnormal" and must never be sent.
_UNSENDABLE = {1004, 1005, 1006, 1015}


def sendable_close(code: int | None, reason: str | None, *, fallback: int) -> tuple[int, str]:
    """A close code and reason that may legally be sent on, given what the other side said."""
    # A reason longer than 123 UTF-8 bytes does not fit a close frame, whichever code it goes with.
    sendable_reason = (reason or "").encode()[:123].decode("utf-8", "ignore")
    if code is None or code in _UNSENDABLE or not (1000 <= code <= 4999) or 1016 <= code < 3000:
        return fallback, sendable_reason
    return code, sendable_reason


class ClientGone(Exception):
    """The client disconnected before the relay started."""


class ClientRelay:
    """Relays one client WebSocket (ASGI) to a fresh connection to the session's child."""

    def __init__(
        self,
        receive: AsgiReceive,
        send: AsgiSend,
        *,
        on_activity: Callable[[], None],
        max_message_size: int,
        policy: ClientPolicy | None = None,
    ) -> None:
        self._receive = receive
        self._send = send
        self._on_activity = on_activity
        self._max_message_size = max_message_size
        self._policy = policy
        # Refusals are answered from the client→child task while the child→client task sends
        # too: one lock keeps the two senders from interleaving.
        self._send_lock = trio.Lock()
        self._client_closed = False
        self.finished = trio.Event()
        self.cancel_scope = trio.CancelScope()
        # Set by the session before cancelling, so the client learns why it was dropped.
        self.close_code = 1001
        self.close_reason = "session stopped"

    def stop(self, code: int, reason: str) -> None:
        """Close this client with ``code``/``reason`` and end the relay."""
        self.close_code, self.close_reason = code, reason
        self.cancel_scope.cancel()

    async def run(
        self,
        child_url: str,
        child_headers: list[tuple[str, str]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect to the child, accept the client, relay until one side ends."""
        try:
            with self.cancel_scope:
                await self._run(child_url, child_headers, task_status)
        finally:
            if not self._client_closed:
                await self._close_client(self.close_code, self.close_reason)
            self.finished.set()

    async def _run(
        self,
        child_url: str,
        child_headers: list[tuple[str, str]],
        task_status: trio.TaskStatus[None],
    ) -> None:
        started = False
        try:
            async with open_child_socket(
                child_url,
                child_headers,
                max_message_size=self._max_message_size,
                connect_timeout=CHILD_CONNECT_TIMEOUT,
            ) as child:
                await self._send({"type": "websocket.accept"})
                started = True
                task_status.started()
                await self._pump(child)
        except (OSError, trio.TooSlowError) as exc:
            if not started:
                # Before started(): the caller (the ASGI handler) turns this into a denial.
                self._client_closed = True
                raise ConnectionError(f"cannot connect to the session's codex: {exc!r}") from None
            log.warning("relay.error", error=repr(exc)[:300])
            self.close_code, self.close_reason = 1011, "gateway relay error"
        except Exception as exc:
            if not started:
                self._client_closed = True
                raise
            # One client's failure stays with that client.
            log.warning("relay.error", error=repr(exc)[:300])
            self.close_code, self.close_reason = 1011, "gateway relay error"

    async def _pump(self, child: ChildSocket) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._client_to_child, child, nursery.cancel_scope)
            nursery.start_soon(self._child_to_client, child, nursery.cancel_scope)

    async def _client_to_child(self, child: ChildSocket, done: trio.CancelScope) -> None:
        receive, on_activity = self._receive, self._on_activity
        frames = metrics.FRAMES.labels(direction="client_to_child")
        size = metrics.FRAME_BYTES.labels(direction="client_to_child")
        try:
            while True:
                message = await receive()
                kind = message["type"]
                if kind == "websocket.receive":
                    text = message.get("text")
                    payload = text if text is not None else message["bytes"]
                    refusal = self._policy.check(payload) if self._policy else None
                    if refusal is not None:
                        await self._refuse(refusal)
                        continue
                    await child.send_message(payload)
                    frames.inc()
                    size.inc(len(payload))
                    on_activity()
                elif kind == "websocket.disconnect":
                    # The client has gone: no close frame is sent back to it.
                    self._client_closed = True
                    code, reason = sendable_close(
                        message.get("code"), message.get("reason"), fallback=1000
                    )
                    metrics.WS_CLOSES.labels(side="client", code=str(message.get("code"))).inc()
                    with trio.move_on_after(CHILD_DISCONNECT_TIMEOUT):
                        await child.close(code, reason)
                    done.cancel()
                    return
        except ChildClosed as closed:
            self._take_child_close(closed)
            done.cancel()

    async def _refuse(self, refusal: Refusal) -> None:
        metrics.POLICY_REFUSALS.labels(rule=refusal.rule).inc()
        log.warning("policy.refused", **refusal.log_fields)
        if refusal.response is not None:
            async with self._send_lock:
                await self._send({"type": "websocket.send", "text": refusal.response})

    async def _child_to_client(self, child: ChildSocket, done: trio.CancelScope) -> None:
        on_activity = self._on_activity
        send = self._locked_send if self._policy else self._send
        frames = metrics.FRAMES.labels(direction="child_to_client")
        size = metrics.FRAME_BYTES.labels(direction="child_to_client")
        try:
            while True:
                message = await child.receive_message()
                if isinstance(message, str):
                    await send({"type": "websocket.send", "text": message})
                else:
                    await send({"type": "websocket.send", "bytes": message})
                frames.inc()
                size.inc(len(message))
                on_activity()
        except ChildClosed as closed:
            self._take_child_close(closed)
            done.cancel()

    async def _locked_send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self._send(message)

    def _take_child_close(self, closed: ChildClosed) -> None:
        if closed.code == 1006:
            # The child's connection dropped without a close frame: the child is gone or dying.
            self.close_code, self.close_reason = 1011, "codex app-server connection lost"
        else:
            self.close_code, self.close_reason = sendable_close(
                closed.code, closed.reason, fallback=1000
            )

    async def _close_client(self, code: int, reason: str) -> None:
        self._client_closed = True
        metrics.WS_CLOSES.labels(side="gateway", code=str(code)).inc()
        with trio.CancelScope(shield=True), trio.move_on_after(CLIENT_CLOSE_TIMEOUT):
            try:
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
            except Exception as exc:
                log.debug("relay.client_close_error", error=repr(exc)[:200])
