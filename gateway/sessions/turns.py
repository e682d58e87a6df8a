"""Whether a session's child is running a turn, asked over the gateway's own connection.

The idle watch needs to know whether a turn is running when no client is attached (the last
client may have left mid-turn; the turn goes on without it). The relay is not asked: following
``turn/started``/``turn/completed`` would mean parsing every child→client frame in the hot path,
and the relay is meant to stay a byte pipe. Instead, only when a session's idle time is up, the
gateway opens one connection of its own to the child (with the capability token), lists the
loaded threads (``thread/loaded/list``) and reads each one's status (``thread/read``, which
does not subscribe). Checked against codex 0.169.0: a thread whose turn is waiting for the
model reads ``{"type": "active", "activeFlags": []}``, also after its client disconnected.

A turn that waits for an approval or for user input (``activeFlags`` not empty) counts as not
running: with no client attached nobody can answer it, and keeping the session for it would
hold a child forever.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import structlog
import trio
import trio_websocket

from gateway.sessions.child import CodexChild

log = structlog.get_logger(__name__)

# A check reads at most this many loaded threads (a child holds a handful in practice).
MAX_THREADS_CHECKED = 500
_MAX_MESSAGE = 16 << 20
_CLIENT_INFO = {"name": "codex-app-gateway", "title": "codex-app-gateway idle check"}


class TurnCheckError(Exception):
    """The child did not answer the check as expected."""


def is_running(status: Any) -> bool:
    """Whether a thread ``status`` object is a turn that is running on its own."""
    return (
        isinstance(status, dict)
        and status.get("type") == "active"
        and not status.get("activeFlags")
    )


async def child_has_running_turn(child: CodexChild, *, connect_timeout: float = 10.0) -> bool:
    """Ask the child whether any loaded thread runs a turn (the caller bounds the time)."""
    ids = itertools.count(1)
    # The gateway's own, rare connection: trio-websocket is plenty (the relay's tunnel is for
    # clients' traffic).
    name, value = child.authorization_header()
    async with trio_websocket.open_websocket_url(
        child.ws_url,
        extra_headers=[(name.encode(), value.encode())],
        max_message_size=_MAX_MESSAGE,
        connect_timeout=connect_timeout,
    ) as socket:

        async def call(method: str, params: dict[str, Any]) -> Any:
            request_id = f"idle-check-{next(ids)}"
            await socket.send_message(
                json.dumps({"id": request_id, "method": method, "params": params})
            )
            while True:
                raw = await socket.get_message()
                message = json.loads(raw)
                if isinstance(message, dict) and message.get("id") == request_id:
                    if "method" in message:
                        continue  # a server request that happens to reuse our id
                    if "result" not in message:
                        raise TurnCheckError(f"{method} failed: {message.get('error')}")
                    return message["result"]

        await call("initialize", {"clientInfo": {**_CLIENT_INFO, "version": "1"}})
        await socket.send_message(json.dumps({"method": "initialized"}))
        checked = 0
        cursor: str | None = None
        while checked < MAX_THREADS_CHECKED:
            page = await call("thread/loaded/list", {"cursor": cursor})
            for thread_id in page.get("data", [])[: MAX_THREADS_CHECKED - checked]:
                checked += 1
                thread = (await call("thread/read", {"threadId": thread_id}))["thread"]
                if is_running(thread.get("status")):
                    return True
            cursor = page.get("nextCursor")
            if not cursor:
                break
        if checked >= MAX_THREADS_CHECKED:
            log.warning("session.idle_check_truncated", threads_checked=checked)
        return False


async def child_is_busy(child: CodexChild, *, within: float) -> bool:
    """``child_has_running_turn`` within ``within`` seconds; a child that cannot answer is not busy.

    A child that does not answer its own gateway within the bound is treated as idle (and so
    stopped and saved) rather than kept forever.
    """
    with trio.move_on_after(within):
        try:
            return await child_has_running_turn(child, connect_timeout=within)
        except (
            OSError,
            trio_websocket.HandshakeError,
            trio_websocket.ConnectionClosed,
            TurnCheckError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:
            log.warning("session.idle_check_failed", error=repr(exc)[:200])
            return False
    log.warning("session.idle_check_failed", error=f"no answer within {within:g}s")
    return False
