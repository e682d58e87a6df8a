"""A turn of the real ``codex app-server`` in a test, and the gateway's executor settings.

Shared by the end-to-end executor tests: ``SELF_COMMAND`` (how the gateway names itself in the
``[mcp_servers]`` entries), ``exec_settings`` (the gateway's settings for the fake exec gateway)
and ``AppServerClient`` (just enough of the app-server protocol for a thread and a turn).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import trio_websocket

from gateway.config import ExecGatewaySettings, Secret
from gateway_tests.executor_fixtures import CAP_SECRET
from gateway_tests.fakes.fake_exec_gateway import FakeExecGateway
from gateway_tests.fakes.launchers import fake_codex_python

# How the daemon tells codex to run this gateway (``gateway.daemon.self_command``); the entries
# append ``env-mcp`` and its flags, so this goes through the real command line.
SELF_COMMAND = (str(fake_codex_python()), "-m", "gateway")


def exec_settings(gateway: FakeExecGateway) -> ExecGatewaySettings:
    """The gateway's exec-gateway settings for ``gateway`` (tokens valid 10 minutes)."""
    return ExecGatewaySettings(
        ws_url=gateway.ws_url,
        internal_url=gateway.base_url,
        internal_secret=Secret(gateway.internal_secret),
        captoken_secret=Secret(CAP_SECRET.decode()),
        captoken_ttl=600.0,
    )


class AppServerClient:
    """The app-server protocol, just enough for a thread and a turn."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []

    async def _receive(self) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await self._ws.get_message())
        if "method" in message and "id" in message:
            # An approval request would mean the entry's approval mode did not take effect.
            raise AssertionError(f"unexpected server request: {message}")
        return message

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        request_id = next(self._ids)
        await self._ws.send_message(
            json.dumps({"id": request_id, "method": method, "params": params})
        )
        while True:
            message = await self._receive()
            if message.get("id") == request_id:
                assert "error" not in message, f"{method} failed: {message['error']}"
                result: dict[str, Any] = message["result"]
                return result
            self.notifications.append(message)

    async def run_turn(self, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Start a thread and one turn; return ``turn/completed``'s turn and every notification."""
        await self.request("initialize", {"clientInfo": {"name": "envmcp-e2e", "version": "1"}})
        await self._ws.send_message(json.dumps({"method": "initialized"}))
        thread = await self.request("thread/start", {})
        # At once, as a user who types straight away: codex must hold the first model request
        # until the executor's env-mcp has listed its tools (mcp_optional_startup_grace_ms = 0).
        started = await self.request(
            "turn/start",
            {"threadId": thread["thread"]["id"], "input": [{"type": "text", "text": text}]},
        )
        turn_id = started["turn"]["id"]
        completed = await self.wait_for(
            lambda m: (
                m.get("method") == "turn/completed"
                and m.get("params", {}).get("turn", {}).get("id") == turn_id
            )
        )
        return completed["params"]["turn"], self.notifications

    async def wait_for(self, matches: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first notification, received so far or next, that ``matches``."""
        for message in self.notifications:
            if matches(message):
                return message
        while True:
            message = await self._receive()
            self.notifications.append(message)
            if matches(message):
                return message
