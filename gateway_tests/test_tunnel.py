"""The relay as a tunnel: the child's handshake, frames, the gateway's own closes, and its bounds.

The frame tracker and the budget are pure and tested without sockets; everything else runs the
real daemon with the fake codex as its child, on real sockets.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import trio
from prometheus_client import REGISTRY
from trio.testing import wait_all_tasks_blocked

from gateway.config import load_config
from gateway.policy import ClientPolicy, Refusal
from gateway.sessions import frames
from gateway.sessions.budget import InflightBudget
from gateway.sessions.handshake import MAX_HEAD
from gateway.sessions.outcome import StopReason
from gateway.sessions.relay import FrameTracker, close_code_label
from gateway.sessions.session import Session
from gateway.sessions.sockets import close_socket
from gateway.sessions.sockets import connect as connect_tcp
from gateway.web import server as front_door
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import (
    POLL_INTERVAL,
    LaunchGateway,
    Rpc,
    RunningGateway,
    connect,
    eventually,
    gateway_env,
    listening_ports,
    start_gateway,
    token_for,
)
from gateway_tests.rawws import RawClient, raw_connect, read_head, upgrade_request

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TIMEOUT = 20.0


# -- pure parts ---------------------------------------------------------------------------------


def test_the_tracker_follows_frames_split_anywhere_across_reads() -> None:
    stream = (
        frames.server_text("a" * 10)
        + frames.server_text("b" * 300)
        + frames.server_ping(b"p")
        + frames.server_text("c" * 70_000)
        + frames.server_close(1000, "bye")
    )
    for cut in (1, 2, 3, 7, 13, 1000):
        tracker = FrameTracker()
        starts = 0
        for offset in range(0, len(stream), cut):
            starts += tracker.feed(stream[offset : offset + cut])
        assert starts == 5, cut
        assert tracker.at_boundary and tracker.close_seen


def test_frames_that_break_the_protocol_are_refused() -> None:
    with pytest.raises(frames.FrameError):
        frames.parse_header(bytes([0x81 | 0x40, 0]))  # RSV1 without an extension
    with pytest.raises(frames.FrameError):
        frames.parse_header(bytes([0x83, 0]))  # reserved opcode
    with pytest.raises(frames.FrameError):
        frames.parse_header(bytes([0x09, 0]))  # fragmented ping
    with pytest.raises(frames.FrameError):
        frames.parse_header(bytes([0x89, 126, 0, 200]))  # ping longer than 125 bytes


async def test_the_budget_serves_waiters_in_order_and_a_cancelled_waiter_takes_nothing() -> None:
    budget = InflightBudget(100)
    await budget.acquire(60)
    order: list[str] = []

    async def take(name: str, amount: int) -> None:
        await budget.acquire(amount)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "big", 80)
        await wait_all_tasks_blocked()
        nursery.start_soon(take, "small", 10)
        await wait_all_tasks_blocked()
        # FIFO: the small request waits behind the big one although it would fit.
        assert order == [] and budget.used == 60
        with trio.CancelScope() as scope:
            scope.cancel()
            await budget.acquire(5)
        assert budget.used == 60
        budget.release(60)
        await wait_all_tasks_blocked()
        assert sorted(order) == ["big", "small"] and budget.used == 90
    budget.release(90)
    assert budget.used == 0
    with pytest.raises(ValueError, match="whole in-flight budget"):
        await budget.acquire(101)


async def test_the_child_connect_sets_nodelay_and_refused_ports_fail_clearly() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    try:
        with trio.fail_after(TIMEOUT):
            for host in ("127.0.0.1", "localhost"):  # an IP literal, and a name to look up
                sock = await connect_tcp(host, port)
                try:
                    assert sock.getpeername()[1] == port
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                    assert not sock.getblocking()
                    accepted, _ = await listener.accept()
                    accepted.close()
                finally:
                    close_socket(sock)
    finally:
        listener.close()
    # Nothing listens on the port any more: the connect fails with the kernel's reason.
    with trio.fail_after(TIMEOUT), pytest.raises(OSError) as refused:
        await connect_tcp("127.0.0.1", port)
    assert refused.value.errno == errno.ECONNREFUSED
    assert f"127.0.0.1:{port}" in str(refused.value)


# -- raw WebSocket clients ------------------------------------------------------------------------


def _address(gateway: RunningGateway) -> tuple[str, int]:
    host, port = gateway.http_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _upgrade(gateway: RunningGateway, workspace: str, key: str, extra: str = "") -> bytes:
    return upgrade_request(*_address(gateway), token_for(workspace), key, extra)


async def _raw_connect(gateway: RunningGateway, workspace: str) -> tuple[bytes, RawClient]:
    return await raw_connect(*_address(gateway), token_for(workspace))


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


# -- the handshake --------------------------------------------------------------------------------


async def test_the_childs_101_answers_the_clients_own_key(gateway: RunningGateway) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(*_address(gateway))
        offer = "Sec-WebSocket-Extensions: permessage-deflate\r\nOrigin-Ignored: x\r\n"
        await stream.send_all(_upgrade(gateway, "ws_handshake", key, offer))
        head, rest = await read_head(stream)
        lines = head.decode().lower().split("\r\n")
        assert lines[0].startswith("http/1.1 101")
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode().lower()
        assert f"sec-websocket-accept: {accept}" in lines
        # No extension is negotiated: the access policy reads every message as sent.
        assert not any(line.startswith("sec-websocket-extensions") for line in lines)
        client = RawClient(stream, rest)
        initialize = {"id": 1, "method": "initialize", "params": {"clientInfo": {"name": "t"}}}
        echo = {"id": 2, "method": "fake/echo", "params": {"payload": "verbatim"}}
        for request in (initialize, echo):
            await client.send(frames.TEXT, json.dumps(request).encode())
            while True:
                opcode, payload = await client.receive()
                assert opcode == frames.TEXT
                if json.loads(payload).get("id") == request["id"]:
                    break
        assert json.loads(payload)["result"]["payload"] == "verbatim", payload
        await stream.aclose()


TCP_ESTABLISHED = "01"


def _connections_to(port: int) -> dict[int, int]:
    """This process's (the in-process gateway's) established TCP connections to loopback
    ``port``: its local port → its descriptor."""
    by_inode = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            by_inode[target[len("socket:[") : -1]] = int(fd)
    found = {}
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        to_port = int(remote.rsplit(":", 1)[1], 16) == port
        if state == TCP_ESTABLISHED and to_port and inode in by_inode:
            found[int(local.rsplit(":", 1)[1], 16)] = by_inode[inode]
    return found


async def _child_port(rpc: Rpc) -> int:
    pid = int((await rpc.result("fake/pid"))["pid"])
    (port,) = listening_ports(pid)
    return port


async def test_each_attach_takes_the_connection_the_last_one_opened_and_none_outlives_it(
    gateway: RunningGateway,
) -> None:
    """After an attach the session holds one idle connection to its child; the next client's
    upgrade goes over it (no connect on its way) and the session's end closes it."""
    async with connect(gateway, "ws_spare") as rpc:
        port = await _child_port(rpc)
        assert len(_connections_to(port)) == 2  # this client's and the one kept ready
    await eventually(lambda: len(_connections_to(port)) == 1)
    (kept,) = _connections_to(port)
    async with connect(gateway, "ws_spare") as rpc:
        assert await _child_port(rpc) == port  # the same session and child
        during = _connections_to(port)
        assert kept in during and len(during) == 2
    await eventually(lambda: len(_connections_to(port)) == 1)
    assert kept not in _connections_to(port)  # it was this client's, and closed with it
    assert (await gateway.restart("ws_spare")).status_code == 204
    await eventually(lambda: not _connections_to(port))


async def test_a_kept_connection_the_child_has_closed_is_replaced_on_the_next_attach(
    gateway: RunningGateway,
) -> None:
    async with connect(gateway, "ws_spare_stale") as rpc:
        port = await _child_port(rpc)
    await eventually(lambda: len(_connections_to(port)) == 1)
    ((kept, fd),) = _connections_to(port).items()
    # What the child closing it looks like from here: reads see the end of the stream.
    stale = socket.socket(fileno=os.dup(fd))
    stale.shutdown(socket.SHUT_RD)
    stale.close()
    async with connect(gateway, "ws_spare_stale") as rpc:
        assert await _child_port(rpc) == port
        # Connected afresh: the stale one is closed, a new one kept for the next client.
        during = _connections_to(port)
        assert kept not in during and len(during) == 2


async def test_an_upgrade_after_an_earlier_request_on_the_same_connection_gets_400(
    gateway: RunningGateway,
) -> None:
    host, port = _address(gateway)
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head, _ = await read_head(stream)
        assert _status(head) == 200
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(_upgrade(gateway, "ws_reused", key))
        received = b""
        while b"new HTTP/1.1 connection" not in received:
            received += await stream.receive_some(65536)
        assert b" 400 " in received.split(b"\r\n", 1)[0] or b"HTTP/1.1 400" in received
        await stream.aclose()
    assert await gateway.session("ws_reused") is None


async def test_a_slowloris_upgrade_head_is_dropped_and_bothers_nobody(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(front_door, "HEAD_TIMEOUT_SECONDS", 1.0)
    async with connect(gateway, "ws_bystander") as bystander:
        stream = await trio.open_tcp_stream(*_address(gateway))
        request = _upgrade(gateway, "ws_slow", base64.b64encode(os.urandom(16)).decode())
        answered = b""
        with trio.fail_after(TIMEOUT):
            for byte in request[:-4]:
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    break
                with trio.move_on_after(0.05):
                    answered += await stream.receive_some(65536)
                if answered:
                    break
            while chunk := await stream.receive_some(65536):
                answered += chunk
        assert answered.startswith(b"HTTP/1.1 408"), answered[:100]
        assert (await bystander.result("fake/echo", {"payload": "ok"}))["payload"] == "ok"
    oversized = b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_HEAD + 10)
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(*_address(gateway))
        await stream.send_all(oversized)
        answered = await stream.receive_some(65536)
        assert answered.startswith(b"HTTP/1.1 431"), answered[:100]
        await stream.aclose()
    assert await gateway.session("ws_slow") is None


# -- the gateway's own closes ---------------------------------------------------------------------


def test_close_codes_map_to_a_bounded_set_of_metric_labels() -> None:
    labels = {close_code_label(code) for code in range(1 << 16)} | {close_code_label(None)}
    assert len(labels) <= 20, labels
    assert close_code_label(1000) == "1000" and close_code_label(1012) == "1012"
    assert close_code_label(3007) == "3xxx" and close_code_label(4999) == "4xxx"
    assert close_code_label(2999) == close_code_label(65535) == "invalid"


async def test_a_clients_own_close_codes_add_no_metric_series(gateway: RunningGateway) -> None:
    """A client picks its close code: the metric counts it under a range, never by number."""

    def closes(code: str) -> float:
        sample = REGISTRY.get_sample_value("cxg_ws_closes_total", {"side": "client", "code": code})
        return sample or 0.0

    before = {label: closes(label) for label in ("3xxx", "4xxx", "invalid")}
    with trio.fail_after(TIMEOUT):
        for code in (4321, 4322, 3007, 2999):
            head, client = await _raw_connect(gateway, "ws_close_codes")
            assert _status(head) == 101
            await client.send(frames.CLOSE, struct.pack("!H", code))
            while (await client.receive())[0] != frames.CLOSE:
                pass
            await client.stream.aclose()
    assert closes("4xxx") - before["4xxx"] == 2
    assert closes("3xxx") - before["3xxx"] == 1
    assert closes("invalid") - before["invalid"] == 1
    for number in ("4321", "4322", "3007", "2999"):
        assert closes(number) == 0.0


async def test_each_stop_reason_reaches_the_client_as_its_own_code_and_reason(
    launch_gateway: LaunchGateway,
) -> None:
    gateway = await launch_gateway()
    async with connect(gateway, "ws_restart") as rpc:
        assert (await gateway.restart("ws_restart")).status_code == 204
        reason = await rpc.closed(within=5)
        assert (reason.code, reason.reason) == (1012, "session restarted by request")
    async with connect(gateway, "ws_crash") as rpc:
        os.kill(int((await rpc.result("fake/pid"))["pid"]), signal.SIGKILL)
        reason = await rpc.closed(within=1)
        assert reason.code == 1011
        assert reason.reason in ("codex app-server exited", "codex app-server connection lost")
    async with connect(gateway, "ws_drain") as rpc:
        gateway.stop.set()
        reason = await rpc.closed(within=10)
        assert (reason.code, reason.reason) == (1001, "gateway shutting down")
    await gateway.stopped.wait()


class _RefuseFakePid(ClientPolicy):
    def check(self, message: str | bytes) -> Refusal | None:
        if isinstance(message, str) and json.loads(message).get("method") == "fake/pid":
            request_id = json.loads(message)["id"]
            error = {"id": request_id, "error": {"code": -32600, "message": "not allowed"}}
            return Refusal("test_rule", json.dumps(error), {"method": "fake/pid"})
        return None


async def _start_refusing_fake_pid(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path
) -> RunningGateway:
    """A gateway with the fake codex whose policy refuses ``fake/pid`` (and nothing else)."""
    env = gateway_env(tmp_path, fake_codex_bin)
    refusing = _RefuseFakePid.for_session(load_config(env), home="/nowhere", codex_home="/nowhere")
    return await start_gateway(nursery, env, policy_for=lambda _session: refusing)


class _RefuseBinaryStartingWithNo(ClientPolicy):
    reads_binary = True  # this policy reads binary messages: the relay unmasks them for it

    def check(self, message: str | bytes) -> Refusal | None:
        if isinstance(message, bytes) and message.startswith(b"no"):
            error = {"id": None, "error": {"code": -32600, "message": "binary refused"}}
            return Refusal("test_binary", json.dumps(error), {"method": None})
        return None


async def test_a_policy_that_reads_binary_gets_each_binary_message_unmasked(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    launcher = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1")
    env = gateway_env(tmp_path, launcher)
    policy = _RefuseBinaryStartingWithNo.for_session(
        load_config(env), home="/nowhere", codex_home="/nowhere"
    )
    gateway = await start_gateway(nursery, env, policy_for=lambda _session: policy)
    try:
        with trio.fail_after(TIMEOUT):
            head, client = await _raw_connect(gateway, "ws_binary_policy")
            assert _status(head) == 101
            # Whole frames, and a message in two fragments (the continuation path).
            await client.send(frames.BINARY, b"no, not this one")
            opcode, payload = await client.receive()
            assert opcode == frames.TEXT and json.loads(payload)["error"]["message"] == (
                "binary refused"
            )
            await client.send(frames.BINARY, b"yes, echo this")
            assert await client.receive() == (frames.BINARY, b"yes, echo this")
            await client.send_fragments(frames.BINARY, [b"n", b"o, in two parts"])
            opcode, payload = await client.receive()
            assert opcode == frames.TEXT and b"binary refused" in payload
            await client.send_fragments(frames.BINARY, [b"y", b"es, in two parts"])
            assert await client.receive() == (frames.BINARY, b"yes, in two parts")
            await client.stream.aclose()
    finally:
        await gateway.shutdown()


async def test_a_client_that_stops_reading_gets_every_byte_later_and_holds_up_no_other(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # Every relay reads its child's bytes into one shared buffer; a client whose socket is
    # full must get what did not fit later, intact, while other clients' bytes keep flowing.
    launcher = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1")
    gateway = await start_gateway(nursery, gateway_env(tmp_path, launcher))
    try:
        with trio.fail_after(60):
            head, stalled = await _raw_connect(gateway, "ws_stalled_reader")
            assert _status(head) == 101
            head, reader = await _raw_connect(gateway, "ws_stalled_reader")
            assert _status(head) == 101
            # Shrink the stalled client's receive buffer so its relay meets a full socket soon.
            stalled.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            blobs = [os.urandom(2 << 20) for _ in range(6)]
            all_sent = trio.Event()

            async def send_all_blobs() -> None:
                for blob in blobs:
                    await stalled.send(frames.BINARY, blob)
                all_sent.set()

            async with trio.open_nursery() as senders:
                senders.start_soon(send_all_blobs)
                # 12 MiB echoed towards a client that reads nothing: more than its relay's
                # socket can hold (the kernel's send buffer is at most 4 MiB, the client's
                # window 64 KiB), so that relay waits on a full socket holding its own copy.
                with trio.fail_after(30):
                    await all_sent.wait()
                for index in range(20):
                    payload = index.to_bytes(2, "big") * (32 << 10)
                    await reader.send(frames.BINARY, payload)
                    assert await reader.receive() == (frames.BINARY, payload)
                for blob in blobs:
                    assert await stalled.receive() == (frames.BINARY, blob)
            await stalled.stream.aclose()
            await reader.stream.aclose()
    finally:
        await gateway.shutdown()


async def test_a_stop_while_a_clients_socket_is_full_delivers_every_byte_owed_before_the_close(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stop cancels the relay while it waits to write the rest of one of the child's frames
    # to a client that reads nothing. The close frame must come after that frame's every byte
    # (what the cancelled write still held, then what the child has yet to send of it), not
    # in the middle of it. The child ignores SIGTERM so that it is still there, within its
    # stop grace, to finish its frame.
    stopping = trio.Event()
    stop = Session.stop

    def stop_and_tell(session: Session, reason: StopReason) -> None:
        stop(session, reason)
        stopping.set()

    monkeypatch.setattr(Session, "stop", stop_and_tell)
    launcher = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1", IGNORE_SIGTERM="1")
    gateway = await start_gateway(nursery, gateway_env(tmp_path, launcher))
    try:
        with trio.fail_after(60):
            head, stalled = await _raw_connect(gateway, "ws_full_at_stop")
            assert _status(head) == 101
            stalled.stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
            blobs = [os.urandom(2 << 20) for _ in range(6)]
            for blob in blobs:
                await stalled.send(frames.BINARY, blob)
            # Echoed towards a client that reads nothing, 12 MiB fill every buffer on the way:
            # the relay is left waiting on the client's full socket, inside one of the frames.
            await wait_all_tasks_blocked(cushion=0.2)

            async def restart() -> None:
                assert (await gateway.restart("ws_full_at_stop")).status_code == 204

            async with trio.open_nursery() as stopping_nursery:
                stopping_nursery.start_soon(restart)
                # The stop cancels the relay's wait at once (Trio delivers a cancellation to a
                # blocked wait when it is made): reading from here on cannot let it finish the
                # frame the ordinary way. Its close has CLOSE_TIMEOUT to reach the client.
                await stopping.wait()
                received: list[bytes] = []
                while True:
                    opcode, payload = await stalled.receive()
                    if opcode == frames.CLOSE:
                        break
                    assert opcode == frames.BINARY
                    received.append(payload)
            assert received == blobs[: len(received)]
            assert len(received) < len(blobs)  # the stop did come mid-stream
            assert struct.unpack("!H", payload[:2])[0] == 1012
            await stalled.stream.aclose()
    finally:
        await gateway.shutdown()


async def test_a_refused_message_gets_the_policys_answer_and_never_reaches_the_child(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path
) -> None:
    gateway = await _start_refusing_fake_pid(nursery, tmp_path, fake_codex_bin)
    try:
        async with connect(gateway, "ws_policy") as rpc:
            refused = await rpc.call("fake/pid")
            assert refused["error"] == {"code": -32600, "message": "not allowed"}
            assert (await rpc.result("fake/echo", {"payload": "after"}))["payload"] == "after"
    finally:
        await gateway.shutdown()


async def test_messages_batched_in_one_write_keep_their_order_through_refusals_and_controls(
    nursery: trio.Nursery, tmp_path: Path, fake_codex_bin: Path
) -> None:
    # The reactor's fast path forwards whole messages of a read itself and leaves the rest of
    # the read to the pump at the first frame it does not finish (a refusal, a ping, a
    # fragment, a frame cut by the read): nothing may be lost, doubled or reordered there.
    gateway = await _start_refusing_fake_pid(nursery, tmp_path, fake_codex_bin)

    def request(request_id: int, method: str = "fake/echo") -> bytes:
        body = {"id": request_id, "method": method, "params": {"payload": f"p{request_id}"}}
        return json.dumps(body).encode()

    async def answers(client: RawClient, ids: set[int]) -> tuple[list[int], list[int], int]:
        echoed: list[int] = []
        refused: list[int] = []
        pongs = 0
        while set(echoed) | set(refused) != ids:
            opcode, payload = await client.receive()
            if opcode == frames.PONG:
                pongs += 1
                continue
            message = json.loads(payload)
            if "error" in message:
                refused.append(message["id"])
            elif message.get("id") in ids:
                assert message["result"]["payload"] == f"p{message['id']}", message
                echoed.append(message["id"])
        return echoed, refused, pongs

    try:
        with trio.fail_after(TIMEOUT):
            head, client = await _raw_connect(gateway, "ws_batched")
            assert _status(head) == 101
            init = {"id": 0, "method": "initialize", "params": {"clientInfo": {"name": "t"}}}
            await client.send(frames.TEXT, json.dumps(init).encode())
            while json.loads((await client.receive())[1]).get("id") != 0:
                pass
            fragmented = request(4)
            batch = b"".join(
                [
                    client.frame(frames.TEXT, request(1)),
                    client.frame(frames.TEXT, request(2, "fake/pid")),
                    client.frame(frames.TEXT, request(3)),
                    client.frame(frames.PING, b"mid-batch"),
                    bytes([frames.TEXT, 0x80 | 5]) + bytes(4) + fragmented[:5],
                    bytes([0x80 | frames.CONTINUATION, 0x80 | (len(fragmented) - 5)])
                    + bytes(4)
                    + fragmented[5:],
                    client.frame(frames.TEXT, request(5)),
                ]
            )
            await client.stream.send_all(batch)
            echoed, refused, pongs = await answers(client, {1, 2, 3, 4, 5})
            assert echoed == [1, 3, 4, 5] and refused == [2]
            if pongs == 0:  # the child's pong may come after the last answer
                assert (await client.receive())[0] == frames.PONG
            # Whole messages, then a frame the read cuts: the fast path hands the cut frame on.
            tail = client.frame(frames.TEXT, request(7))
            await client.stream.send_all(client.frame(frames.TEXT, request(6)) + tail[:9])
            assert await answers(client, {6}) == ([6], [], 0)
            await client.stream.send_all(tail[9:] + client.frame(frames.TEXT, request(8)))
            assert await answers(client, {7, 8}) == ([7, 8], [], 0)
            await client.stream.aclose()
    finally:
        await gateway.shutdown()


# -- bounds ---------------------------------------------------------------------------------------


async def test_one_tenants_connections_are_capped_and_other_tenants_still_start(
    gateway: RunningGateway,
) -> None:
    cap = gateway.config.max_clients_per_workspace
    statuses: list[int] = []
    clients: list[RawClient] = []
    with trio.fail_after(60):
        for _ in range(cap + 60):
            head, client = await _raw_connect(gateway, "ws_greedy")
            statuses.append(_status(head))
            if _status(head) == 101:
                clients.append(client)
            else:
                await client.stream.aclose()
        assert statuses.count(101) == cap
        assert set(statuses[cap:]) == {429}
        async with connect(gateway, "ws_other") as other:
            assert (await other.result("fake/echo", {"payload": "hi"}))["payload"] == "hi"
        for client in clients:
            await client.stream.aclose()


def test_the_soft_open_files_limit_is_raised_to_the_hard_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)
    script = (
        "import resource; from gateway.daemon import raise_open_files_limit; "
        "raise_open_files_limit(); print('limit', *resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)),
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("limit "))
    after_soft, after_hard = (int(v) for v in line.split()[1:])
    assert after_hard == hard
    if hard == resource.RLIM_INFINITY:
        assert after_soft > low
    else:
        assert after_soft == hard
    assert soft <= hard


async def _inflight(gateway: RunningGateway) -> float:
    async with httpx2.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{gateway.http_url}/metrics")).text
    for line in text.splitlines():
        if line.startswith("cxg_ws_inflight_bytes "):
            return float(line.split()[1])
    raise AssertionError("cxg_ws_inflight_bytes not exported")


async def test_a_child_that_does_not_read_holds_its_clients_back_within_the_budget(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    launcher = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1")
    budget = 8 << 20
    env = gateway_env(
        tmp_path, launcher, CXG_WS_MAX_MESSAGE_SIZE="4MiB", CXG_WS_INFLIGHT_BUDGET="8MiB"
    )
    gateway = await start_gateway(nursery, env)
    try:
        async with connect(gateway, "ws_stalled") as rpc:
            pid = int((await rpc.result("fake/pid"))["pid"])
            blob = os.urandom(4 << 20)
            writers: list[RawClient] = []
            sent = [0]
            for _ in range(6):
                head, client = await _raw_connect(gateway, "ws_stalled")
                assert _status(head) == 101
                writers.append(client)
            os.kill(pid, signal.SIGSTOP)
            try:
                async with trio.open_nursery() as senders:

                    async def flood(client: RawClient) -> None:
                        for _ in range(4):
                            await client.send(frames.BINARY, blob)
                            sent[0] += 1

                    for client in writers:
                        senders.start_soon(flood, client)
                    # 6 clients x 4 frames of 4 MiB = 96 MiB offered; the child reads nothing.
                    # Wait for the budget to be in use (a whole frame held), checking on every
                    # look that it is never exceeded.
                    with trio.fail_after(20):
                        while (held := await _inflight(gateway)) < len(blob):
                            assert held <= budget
                            await trio.sleep(POLL_INTERVAL)
                    assert await _inflight(gateway) <= budget
                    # Backpressure: most of what was offered is still with the senders.
                    assert sent[0] < 6 * 4
                    os.kill(pid, signal.SIGCONT)
                    with trio.fail_after(60):
                        for client in writers:
                            for _ in range(4):
                                opcode, payload = await client.receive()
                                assert opcode == frames.BINARY and payload == blob
            finally:
                os.kill(pid, signal.SIGCONT)
            assert await _inflight(gateway) == 0
            for client in writers:
                await client.stream.aclose()
    finally:
        await gateway.shutdown()


async def test_five_hundred_clients_sending_1mib_frames_at_once_all_get_their_echo(
    launch_gateway: LaunchGateway, tmp_path: Path
) -> None:
    launcher = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1")
    gateway = await launch_gateway(
        launcher,
        CXG_MAX_CLIENTS_PER_WORKSPACE="0",
        CXG_WS_MAX_MESSAGE_SIZE="1MiB",
        CXG_WS_INFLIGHT_BUDGET="32MiB",
    )
    peak = [0.0]
    echoed = [0]
    try:
        async with connect(gateway, "ws_burst"):
            clients = []
            with trio.fail_after(120):
                for _ in range(500):
                    head, client = await _raw_connect(gateway, "ws_burst")
                    assert _status(head) == 101
                    clients.append(client)
                go = trio.Event()

                async def burst(client: RawClient, blob: bytes) -> None:
                    await go.wait()
                    await client.send(frames.BINARY, blob)
                    opcode, payload = await client.receive()
                    assert opcode == frames.BINARY and payload == blob
                    echoed[0] += 1

                async def watch() -> None:
                    while True:
                        peak[0] = max(peak[0], await _inflight(gateway))
                        await trio.sleep(0.05)

                async with trio.open_nursery() as burst_nursery:
                    watcher = trio.CancelScope()

                    async def watching() -> None:
                        with watcher:
                            await watch()

                    burst_nursery.start_soon(watching)
                    async with trio.open_nursery() as senders:
                        for client in clients:
                            senders.start_soon(burst, client, os.urandom(1 << 20))
                        go.set()
                    watcher.cancel()
            assert echoed[0] == 500
            assert 0 < peak[0] <= 32 << 20
            for client in clients:
                await client.stream.aclose()
    finally:
        await gateway.shutdown()


async def test_connections_cancelled_at_shutdown_are_not_logged_as_errors(
    launch_gateway: LaunchGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await launch_gateway()
    host, port = _address(gateway)
    # Half a request head: its connection is still being read when the server stops, and is
    # cancelled by the graceful-shutdown deadline.
    stream = await trio.open_tcp_stream(host, port)
    await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n".encode())
    with trio.fail_after(TIMEOUT):
        await gateway.shutdown()
    await stream.aclose()
    logged = capsys.readouterr().out
    assert "daemon.stopped" in logged
    assert "http.connection_error" not in logged
