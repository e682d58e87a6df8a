"""The benchmark client: trio-websocket, the same code on every path.

Every connection sends ``initialize`` and waits for its reply, then ``initialized``; unsolicited
notifications (``configWarning`` and the like) are skipped.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

MAX_MESSAGE = 128 << 20
# trio-websocket reads 4 KiB at a time by default, which makes the client itself the bottleneck
# for large frames; read what the socket has, up to 64 KiB (what Hypercorn reads).
RECEIVE_BUFFER = 64 * 1024
CONNECT_TIMEOUT = 60.0
SMALL_REQUEST = '{{"id":{},"method":"thread/read","params":{{}}}}'
INITIALIZE = json.dumps(
    {
        "id": 0,
        "method": "initialize",
        "params": {"clientInfo": {"name": "gateway-bench", "version": "1.0"}},
    }
)
INITIALIZED = json.dumps({"method": "initialized"})


@contextlib.asynccontextmanager
async def connect(
    url: str, headers: Sequence[tuple[str, str]]
) -> AsyncIterator[WebSocketConnection]:
    """One client WebSocket with a large message limit."""
    async with open_websocket_url(
        url,
        extra_headers=[(k.encode(), v.encode()) for k, v in headers],
        max_message_size=MAX_MESSAGE,
        receive_buffer_size=RECEIVE_BUFFER,
        connect_timeout=CONNECT_TIMEOUT,
        disconnect_timeout=5,
    ) as ws:
        yield ws


async def initialize(ws: WebSocketConnection) -> None:
    """The handshake every connection starts with."""
    await ws.send_message(INITIALIZE)
    await _await_id(ws, 0)
    await ws.send_message(INITIALIZED)


async def _await_id(ws: WebSocketConnection, request_id: int) -> None:
    marker = f'"id":{request_id}'
    for _ in range(10_000):
        message = await ws.get_message()
        if isinstance(message, str) and marker in message.replace(" ", ""):
            parsed = json.loads(message)
            if parsed.get("id") == request_id and "method" not in parsed:
                return
    raise RuntimeError(f"no reply to request {request_id}")


async def small_round_trips(ws: WebSocketConnection, count: int, first_id: int = 1) -> list[float]:
    """``count`` sequential ``thread/read`` round trips; each one's seconds."""
    samples = []
    clock = time.perf_counter
    for request_id in range(first_id, first_id + count):
        started = clock()
        await ws.send_message(SMALL_REQUEST.format(request_id))
        await _await_id(ws, request_id)
        samples.append(clock() - started)
    return samples


async def connect_and_initialize(url: str, headers: Sequence[tuple[str, str]]) -> float:
    """Seconds from opening the TCP connection to the ``initialize`` reply; then close."""
    started = time.perf_counter()
    async with connect(url, headers) as ws:
        await initialize(ws)
        elapsed = time.perf_counter() - started
    return elapsed


async def interleaved_attaches(
    endpoints: dict[str, tuple[str, Sequence[tuple[str, str]]]], count: int
) -> dict[str, list[float]]:
    """``count`` attaches (``connect_and_initialize``) per path, taking the paths in turn.

    One attach per path at a time, not a batch per path: a machine whose speed drifts (a
    shared, noisy one) then moves every path alike, and the differences between paths stay
    the gateway's own.
    """
    samples: dict[str, list[float]] = {path: [] for path in endpoints}
    for _ in range(count):
        for path, (url, headers) in endpoints.items():
            samples[path].append(await connect_and_initialize(url, headers))
    return samples


async def echo_round_trips(ws: WebSocketConnection, payload: bytes, count: int) -> float:
    """``count`` binary frames sent and echoed, one at a time; total seconds."""
    started = time.perf_counter()
    for _ in range(count):
        await ws.send_message(payload)
        echoed = await ws.get_message()
        if len(echoed) != len(payload):
            raise RuntimeError(f"echo returned {len(echoed)} bytes for {len(payload)}")
    return time.perf_counter() - started


async def wait_http_ok(url: str, within: float) -> None:
    """Poll ``url`` until it answers 200 (used for /readyz of a child started directly)."""
    import httpx2

    async with httpx2.AsyncClient(timeout=2) as http:
        with trio.fail_after(within):
            while True:
                try:
                    response = await http.get(url)
                    if response.status_code == 200:
                        return
                except httpx2.HTTPError:
                    pass
                await trio.sleep(0.005)
