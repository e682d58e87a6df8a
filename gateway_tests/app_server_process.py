"""A codex app-server run directly on a loopback port, and a JSON-RPC client for it.

``running_fake`` starts ``LAUNCHER app-server --listen ws://127.0.0.1:0`` (the fake codex, or
the pinned real binary for the contract tests that hold both to the same behaviour) and yields
once its banner is out; ``Client`` speaks JSON-RPC-lite over one WebSocket to it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection

BANNER_PORT = re.compile(r"listening on: ws://127\.0\.0\.1:(\d+)")


def child_env(home: Path, **extra: str) -> dict[str, str]:
    """A small explicit environment, like the gateway's allow-list."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home),
    }
    env.update(extra)
    return env


class FakeProcess:
    """A running fake codex: its process, bound port and stderr lines."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.port = 0
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def pump_stderr(self) -> None:
        """Collect stderr lines until EOF, waking anyone waiting for a line."""
        assert self.proc.stderr is not None
        buffer = b""
        while True:
            chunk = await self.proc.stderr.receive_some(65536)
            if not chunk:
                break
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            self.lines += [line.decode("utf-8", "replace") for line in complete]
            self._changed.set()
            self._changed = trio.Event()
        self._changed.set()

    async def wait_for_line(self, pattern: str) -> re.Match[str]:
        """The first stderr line matching `pattern` (waits for it; never polls with sleeps)."""
        regex = re.compile(pattern)
        seen = 0
        while True:
            for line in self.lines[seen:]:
                found = regex.search(line)
                if found:
                    return found
            seen = len(self.lines)
            if self.proc.returncode is not None and self._changed.is_set():
                raise AssertionError(f"fake exited before printing {pattern!r}: {self.lines}")
            await self._changed.wait()

    @property
    def url(self) -> str:
        """The WebSocket URL of the fake."""
        return f"ws://127.0.0.1:{self.port}/"


@asynccontextmanager
async def running_fake(
    launcher: Path, home: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[FakeProcess]:
    """Start `launcher app-server --listen ws://127.0.0.1:0 ARGS`, yield once the banner is out."""
    await trio.Path(home).mkdir(parents=True, exist_ok=True)
    argv = [str(launcher), "app-server", "--listen", "ws://127.0.0.1:0", *args]
    proc = await trio.lowlevel.open_process(
        argv, env=env or child_env(home), stdin=None, stdout=None, stderr=-1
    )
    fake = FakeProcess(proc)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake.pump_stderr)
            with trio.fail_after(10):
                fake.port = int((await fake.wait_for_line(BANNER_PORT.pattern)).group(1))
                await fake.wait_for_line(r"^  note: ")
            yield fake
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


async def http_get(port: int, path: str, *headers: tuple[str, str]) -> tuple[int, bytes]:
    """One raw HTTP/1.1 request; returns (status, body).

    Reads the head and a Content-Length body: the real server keeps the connection open, so
    reading to EOF would hang (the fake closes after answering).
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            body += chunk
    return int(head.split(b" ")[1]), body


UPGRADE_HEADERS = (
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
)


class Client:
    """A JSON-RPC-lite client over one WebSocket, keeping notifications aside."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0
        self.notifications: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message as a text frame."""
        await self.ws.send_message(json.dumps(message))

    async def receive(self) -> dict[str, Any]:
        """The next message (of any kind)."""
        message = await self.ws.get_message()
        assert isinstance(message, str)
        return json.loads(message)

    async def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and return the whole response (result or error)."""
        self.next_id += 1
        request_id = self.next_id
        await self.send({"id": request_id, "method": method, "params": params or {}})
        while True:
            message = await self.receive()
            if message.get("id") == request_id and "method" not in message:
                return message
            self.notifications.append(message)

    async def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send a request and return its result, failing on an error answer."""
        response = await self.call(method, params)
        assert "result" in response, response
        return response["result"]

    async def initialize(self) -> dict[str, Any]:
        """The handshake: `initialize` then `initialized`."""
        result = await self.result("initialize", {"clientInfo": {"name": "tests", "version": "1"}})
        await self.send({"method": "initialized"})
        return result

    async def until(self, method: str, **match: Any) -> dict[str, Any]:
        """Wait for a notification `method` (already received or next) whose params match."""
        for index, message in enumerate(self.notifications):
            if message.get("method") == method and _matches(message, match):
                return self.notifications.pop(index)
        while True:
            message = await self.receive()
            if message.get("method") == method and _matches(message, match):
                return message
            self.notifications.append(message)


def _matches(message: dict[str, Any], match: dict[str, Any]) -> bool:
    params = message.get("params") or {}
    return all(params.get(key) == value for key, value in match.items())
