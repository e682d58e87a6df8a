"""The pod-to-pod hop: a connect to pod B for a workspace pod A owns is served by A's child.

Two real daemons in replica mode share one moto bucket; a ``TablePlacement`` on each says who
owns which workspace (see hop_support.py). Clients connect to B only; B verifies the token and
forwards to A's internal listener through a ``HopTap`` that records what A receives and can cut
the hop.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx2
import pytest
import trio
from trio_websocket import ConnectionRejected

from gateway.config import S3Settings, load_config
from gateway.daemon import run_daemon
from gateway.replicas.forward import HOP_LOST, hop_request
from gateway.replicas.grants import GrantSigner
from gateway.replicas.placement import PeerOwner
from gateway.sessions import frames
from gateway.sessions.handshake import parse_request_head
from gateway.web.server import BindError
from gateway.web.websocket import OWNER_MOVING, OWNER_UNREACHABLE, START_FAILED
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import (
    ADMIN_SECRET,
    closed_port,
    connect,
    eventually,
    gateway_env,
    rejected_connect,
    token_for,
)
from gateway_tests.rawws import RawClient, read_head, upgrade_request
from gateway_tests.replicas.hop_support import (
    PEER_SECRET,
    HopTap,
    Pod,
    TablePlacement,
    s3_env,
    start_pod,
)

TIMEOUT = 30
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
EPOCH = 3


@attrs.define
class Pair:
    """Pod A owns the test's workspaces; clients connect to pod B."""

    a: Pod
    b: Pod
    tap: HopTap

    def own(self, workspace_id: str, *, epoch: int = EPOCH, b_sees: int | None = None) -> None:
        """A owns ``workspace_id`` at ``epoch``; B believes it is A at ``b_sees`` (default:
        the same epoch) and reaches A through the tap."""
        self.a.placement.owners[workspace_id] = PeerOwner("gw-a", self.a.peer_addr, epoch)
        self.b.placement.owners[workspace_id] = PeerOwner(
            "gw-a", self.tap.address, epoch if b_sees is None else b_sees
        )

    async def a_sessions(self) -> list[str]:
        """Workspaces with a session on A."""
        return [s["workspaceId"] for s in await self.a.gateway.sessions()]


LaunchPair = Callable[..., Awaitable[Pair]]


@pytest.fixture
async def launch_pair(
    nursery: trio.Nursery, tmp_path: Path, s3_settings: S3Settings
) -> AsyncIterator[LaunchPair]:
    pods: list[Pod] = []

    async def launch(knobs: dict[str, str] | None = None, **env: str) -> Pair:
        launcher = make_fake_codex_launcher(tmp_path / "bin", **(knobs or {}))
        s3 = s3_env(s3_settings)
        a = await start_pod(nursery, tmp_path, "gw-a", launcher, s3, TablePlacement("gw-a"), **env)
        pods.append(a)
        b = await start_pod(nursery, tmp_path, "gw-b", launcher, s3, TablePlacement("gw-b"), **env)
        pods.append(b)
        tap: HopTap = await nursery.start(HopTap(a.peer_addr).serve)
        return Pair(a, b, tap)

    yield launch
    for pod in reversed(pods):
        await pod.gateway.shutdown()


@pytest.fixture
async def pair(launch_pair: LaunchPair) -> Pair:
    return await launch_pair({"ECHO_BINARY": "1"})


def _address(pod: Pod) -> tuple[str, int]:
    host, port = pod.gateway.http_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def _raw_connect(pod: Pod, workspace_id: str, extra: str = "") -> tuple[bytes, RawClient]:
    host, port = _address(pod)
    stream = await trio.open_tcp_stream(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(upgrade_request(host, port, token_for(workspace_id), key, extra))
    head, rest = await read_head(stream)
    return head, RawClient(stream, rest)


async def _metric(pod: Pod, name: str) -> float:
    async with httpx2.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{pod.gateway.http_url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    )


def _body(refused: ConnectionRejected) -> str:
    return (refused.body or b"").decode()


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


# -- frames, closes and limits cross the hop ------------------------------------------------------


async def test_frames_pass_verbatim_both_ways_and_the_child_runs_on_the_owner(pair: Pair) -> None:
    pair.own("ws_frames")
    relayed_before = await _metric(pair.b, 'cxg_forwarded_connections_total{result="relayed"}')
    with trio.fail_after(TIMEOUT):
        async with connect(pair.b.gateway, "ws_frames") as rpc:
            child_pid = int((await rpc.result("fake/pid"))["pid"])
            # Large text, both ways.
            big = "é" + "x" * (5 << 20)
            assert (await rpc.result("fake/echo", {"payload": big}))["payload"] == big
            # Many small ones.
            for n in range(300):
                assert (await rpc.result("fake/echo", {"payload": n}))["payload"] == n
        head, raw = await _raw_connect(pair.b, "ws_frames")
        assert _status(head) == 101
        # Binary, large and small: the child echoes the bytes as they were sent.
        for blob in (os.urandom(3 << 20), b"\x00\xff" * 7, os.urandom(70_000)):
            await raw.send(frames.BINARY, blob)
            assert await raw.receive() == (frames.BINARY, blob)
        await raw.stream.aclose()
    # The child is A's: A lists the session, B has none, and no child was ever started on B.
    assert await pair.a_sessions() == ["ws_frames"]
    assert (await pair.a.gateway.session("ws_frames") or {})["pid"] == child_pid
    assert await pair.b.gateway.sessions() == []
    assert pair.b.codex_homes() == []
    relayed = await _metric(pair.b, 'cxg_forwarded_connections_total{result="relayed"}')
    assert relayed - relayed_before == 2
    assert await _metric(pair.b, "cxg_forwarded_bytes_total") > 10 << 20


async def test_the_owners_101_answers_the_clients_own_key_through_the_hop(pair: Pair) -> None:
    pair.own("ws_handshake")
    host, port = _address(pair.b)
    key = base64.b64encode(os.urandom(16)).decode()
    offer = "Sec-WebSocket-Extensions: permessage-deflate\r\n"
    with trio.fail_after(TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        await stream.send_all(upgrade_request(host, port, token_for("ws_handshake"), key, offer))
        head, _ = await read_head(stream)
    await stream.aclose()
    lines = head.decode().lower().split("\r\n")
    assert lines[0].startswith("http/1.1 101")
    # The accept key answers the client's own key: the handshake is end to end, B → A → child.
    accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode().lower()
    assert f"sec-websocket-accept: {accept}" in lines
    # And, as on a direct connect, no extension is negotiated (the owner's policy reads every
    # message as sent).
    assert not any(line.startswith("sec-websocket-extensions") for line in lines)


async def test_close_codes_and_reasons_cross_the_hop_both_ways(pair: Pair) -> None:
    pair.own("ws_close")
    with trio.fail_after(TIMEOUT):
        async with connect(pair.b.gateway, "ws_close") as rpc:
            await rpc.result("fake/close", {"code": 4321, "reason": "child says bye"})
            reason = await rpc.closed(within=5)
            assert (reason.code, reason.reason) == (4321, "child says bye")
        async with connect(pair.b.gateway, "ws_close") as rpc:
            await rpc.ws.aclose(code=4001, reason="client leaving")
        # The child on A recorded the client's own close.
        [home] = pair.a.codex_homes()
        closes = home / "fake-codex-closes.jsonl"

        def recorded() -> list[dict[str, Any]]:
            text = closes.read_text() if closes.exists() else ""
            return [json.loads(line) for line in text.splitlines()]

        await eventually(lambda: {"code": 4001, "reason": "client leaving"} in recorded())


async def test_the_owner_enforces_the_message_size_limit_1009(launch_pair: LaunchPair) -> None:
    pair = await launch_pair({"ECHO_BINARY": "1"}, CXG_WS_MAX_MESSAGE_SIZE="1MiB")
    pair.own("ws_big")
    with trio.fail_after(TIMEOUT):
        async with connect(pair.b.gateway, "ws_big") as rpc:
            await rpc.ws.send_message(b"\x01" * ((1 << 20) + 1))
            reason = await rpc.closed(within=5)
    assert reason.code == 1009
    assert "CXG_WS_MAX_MESSAGE_SIZE" in (reason.reason or "")
    # The session and its child go on for the next client.
    async with connect(pair.b.gateway, "ws_big") as rpc:
        assert (await rpc.result("fake/echo", {"payload": 1}))["payload"] == 1


async def test_a_child_crash_on_the_owner_reaches_the_forwarded_client_within_a_second(
    pair: Pair,
) -> None:
    pair.own("ws_crash")
    async with connect(pair.b.gateway, "ws_crash") as rpc:
        os.kill(int((await rpc.result("fake/pid"))["pid"]), signal.SIGKILL)
        reason = await rpc.closed(within=1)
    assert reason.code == 1011
    assert reason.reason in ("codex app-server exited", "codex app-server connection lost")


async def test_a_hop_cut_mid_stream_closes_the_client_with_1011_at_once(pair: Pair) -> None:
    pair.own("ws_cut")
    failures_before = await _metric(pair.b, 'cxg_hop_failures_total{stage="mid_stream"}')
    async with connect(pair.b.gateway, "ws_cut") as rpc:
        assert (await rpc.result("fake/echo", {"payload": "before"}))["payload"] == "before"
        pair.tap.cut()
        reason = await rpc.closed(within=1)
    assert (reason.code, reason.reason) == HOP_LOST
    assert await _metric(pair.b, 'cxg_hop_failures_total{stage="mid_stream"}') > failures_before


async def test_an_owner_that_drains_closes_its_forwarded_clients_end_to_end(pair: Pair) -> None:
    pair.own("ws_owner_drain")
    async with connect(pair.b.gateway, "ws_owner_drain") as rpc:
        await rpc.result("fake/pid")
        pair.a.gateway.stop.set()
        reason = await rpc.closed(within=10)
    # The owner's own close code and reason, verbatim through B.
    assert (reason.code, reason.reason) == (1001, "gateway shutting down")


async def test_draining_the_forwarding_pod_closes_its_forwarded_clients_with_1001(
    pair: Pair,
) -> None:
    pair.own("ws_b_drain")
    async with connect(pair.b.gateway, "ws_b_drain") as rpc:
        await rpc.result("fake/pid")
        pair.b.gateway.stop.set()
        reason = await rpc.closed(within=5)
        assert (reason.code, reason.reason) == (1001, "gateway shutting down")
    await pair.b.gateway.stopped.wait()
    # The owner's session is untouched by another pod's drain.
    assert await pair.a_sessions() == ["ws_b_drain"]


async def test_a_drain_closes_a_forwarded_client_between_frames(pair: Pair) -> None:
    pair.own("ws_drain_frame")
    head, raw = await _raw_connect(pair.b, "ws_drain_frame")
    assert _status(head) == 101
    blob = os.urandom(8 << 20)
    await raw.send(frames.BINARY, blob)
    with trio.fail_after(TIMEOUT):
        # The echo of 8 MiB has started reaching the client (its first bytes are here, the
        # rest is on its way and not read) when B drains.
        raw.buffer += await raw.stream.receive_some(1024)
        pair.b.gateway.stop.set()
        # The frame in progress is finished first, then B's close follows it.
        assert await raw.receive() == (frames.BINARY, blob)
        opcode, payload = await raw.receive()
        assert opcode == frames.CLOSE
        assert frames.parse_close(payload) == (1001, "gateway shutting down")
    await raw.stream.aclose()


# -- finding the owner ----------------------------------------------------------------------------


async def test_an_owner_that_moved_is_read_again_and_the_retry_succeeds(pair: Pair) -> None:
    # B still believes the old epoch; A holds the workspace at the next one.
    pair.own("ws_moved", epoch=EPOCH + 1, b_sees=EPOCH)

    def move(workspace_id: str, claims: int) -> None:
        if claims == 2:  # the retry re-reads the (now current) record
            pair.b.placement.owners[workspace_id] = PeerOwner("gw-a", pair.tap.address, EPOCH + 1)

    pair.b.placement.before_claim = move
    async with connect(pair.b.gateway, "ws_moved") as rpc:
        pid = int((await rpc.result("fake/pid"))["pid"])
    assert pair.b.placement.claims == ["ws_moved", "ws_moved"]
    assert (await pair.a.gateway.session("ws_moved") or {})["pid"] == pid


async def test_a_workspace_that_moved_to_the_forwarding_pod_is_served_there(pair: Pair) -> None:
    # A answers 409 (it holds another epoch); on the retry the record names B itself.
    pair.own("ws_came_here", epoch=EPOCH + 1, b_sees=EPOCH)

    def move(workspace_id: str, claims: int) -> None:
        if claims == 2:
            pair.b.placement.owners[workspace_id] = PeerOwner("gw-b", pair.b.peer_addr, 9)

    pair.b.placement.before_claim = move
    async with connect(pair.b.gateway, "ws_came_here") as rpc:
        pid = int((await rpc.result("fake/pid"))["pid"])
    assert (await pair.b.gateway.session("ws_came_here") or {})["pid"] == pid
    assert await pair.a_sessions() == []


async def test_an_owner_that_keeps_moving_gets_503_after_three_tries(pair: Pair) -> None:
    pair.own("ws_moving", epoch=EPOCH + 1, b_sees=EPOCH)
    refused = await rejected_connect(
        pair.b.gateway.ws_url,
        [(b"authorization", f"Bearer {token_for('ws_moving')}".encode())],
    )
    assert refused.status_code == 503
    body = _body(refused)
    assert body.startswith(OWNER_MOVING + " (request id ")
    assert pair.b.placement.claims == ["ws_moving"] * 3
    # A refused each try before starting anything.
    assert await pair.a_sessions() == []
    assert pair.tap.connections == 3


async def test_a_full_forwarding_pod_still_forwards_and_refuses_only_what_it_would_host(
    launch_pair: LaunchPair,
) -> None:
    # CXG_MAX_SESSIONS bounds the sessions a pod hosts, not the connects it forwards.
    pair = await launch_pair({"ECHO_BINARY": "1"}, CXG_MAX_SESSIONS="1")
    async with connect(pair.b.gateway, "ws_hosted_on_b") as rpc:
        await rpc.result("fake/pid")
        pair.own("ws_on_a")
        async with connect(pair.b.gateway, "ws_on_a") as forwarded:
            pid = int((await forwarded.result("fake/pid"))["pid"])
        assert (await pair.a.gateway.session("ws_on_a") or {})["pid"] == pid
        # Asked before anything starts: no session was made on B for A's workspace.
        assert "ws_on_a" not in pair.b.placement.claims
        refused = await rejected_connect(
            pair.b.gateway.ws_url,
            [(b"authorization", f"Bearer {token_for('ws_nobodys')}".encode())],
        )
        assert refused.status_code == 503
        assert "CXG_MAX_SESSIONS" in _body(refused)
    assert [s["workspaceId"] for s in await pair.b.gateway.sessions()] == ["ws_hosted_on_b"]


async def test_an_unreachable_owner_gets_503_with_a_fixed_sentence(pair: Pair) -> None:
    pair.b.placement.owners["ws_gone"] = PeerOwner("gw-a", f"127.0.0.1:{await closed_port()}", 1)
    refused = await rejected_connect(
        pair.b.gateway.ws_url,
        [(b"authorization", f"Bearer {token_for('ws_gone')}".encode())],
    )
    assert refused.status_code == 503
    assert _body(refused).startswith(OWNER_UNREACHABLE + " (request id ")
    assert "127.0.0.1" not in _body(refused)


async def test_the_owners_own_refusal_reaches_the_client(launch_pair: LaunchPair) -> None:
    pair = await launch_pair(CXG_MAX_CLIENTS_PER_WORKSPACE="1")
    pair.own("ws_cap")
    async with connect(pair.b.gateway, "ws_cap") as rpc:
        await rpc.result("fake/pid")
        refused = await rejected_connect(
            pair.b.gateway.ws_url,
            [(b"authorization", f"Bearer {token_for('ws_cap')}".encode())],
        )
    # The cap is counted on the owner, and its answer is passed on as it was (the sentence
    # and the request id of the owner's log line).
    assert refused.status_code == 429
    assert _body(refused).startswith(START_FAILED + " (request id ")


# -- the owner's side of the trust boundary -------------------------------------------------------


async def test_the_bearer_token_never_crosses_the_hop(pair: Pair) -> None:
    pair.own("ws_token")
    token = token_for("ws_token")
    async with connect(pair.b.gateway, "ws_token") as rpc:
        await rpc.result("fake/echo", {"payload": "hello"})
    [received] = pair.tap.received
    request = parse_request_head(bytes(received[: received.index(b"\r\n\r\n") + 4]))
    assert request is not None
    assert token.encode() not in received
    assert request.header("authorization") is None
    assert request.header("origin") is None
    assert request.header("x-cxg-peer-grant") is not None
    assert request.header("x-cxg-forwarded-by") == "gw-b"


async def _peer_upgrade(pod: Pod, extra: str, target: str = "/") -> tuple[int, bytes]:
    host, port = pod.peer_addr.rsplit(":", 1)
    key = base64.b64encode(os.urandom(16)).decode()
    stream = await trio.open_tcp_stream(host, int(port))
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {pod.peer_addr}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        f"{extra}\r\n"
    )
    with trio.fail_after(TIMEOUT):
        await stream.send_all(request.encode())
        head, _ = await read_head(stream)
    await stream.aclose()
    return _status(head), head


def _grant(workspace_id: str, *, secret: str = PEER_SECRET, pod: str = "gw-a", **kw: Any) -> str:
    return GrantSigner(secret, **kw).sign(
        workspace_id=workspace_id, user_id="", epoch=EPOCH, pod=pod
    )


async def test_forged_expired_replayed_and_misdirected_grants_start_nothing(pair: Pair) -> None:
    pair.own("ws_trust")
    refused_before = await _metric(pair.a, 'cxg_peer_connects_total{result="grant_refused"}')
    valid = _grant("ws_trust")
    attempts = {
        "no grant": "",
        "forged": f"X-Cxg-Peer-Grant: {_grant('ws_trust', secret='guessed-secret')}\r\n",
        "expired": f"X-Cxg-Peer-Grant: {_grant('ws_trust', now=lambda: 1_000_000.0)}\r\n",
        "other pod": f"X-Cxg-Peer-Grant: {_grant('ws_trust', pod='gw-b')}\r\n",
        "two grants": f"X-Cxg-Peer-Grant: {valid}\r\nX-Cxg-Peer-Grant: {valid}\r\n",
        "garbage": "X-Cxg-Peer-Grant: v1.garbage.garbage\r\n",
        "bearer instead": f"Authorization: Bearer {token_for('ws_trust')}\r\n",
    }
    for what, extra in attempts.items():
        status, _ = await _peer_upgrade(pair.a, extra)
        assert status == 401, what
    assert await pair.a_sessions() == []
    assert await _metric(
        pair.a, 'cxg_peer_connects_total{result="grant_refused"}'
    ) - refused_before == len(attempts)
    # The valid grant works once; its replay is refused.
    status, _ = await _peer_upgrade(pair.a, f"X-Cxg-Peer-Grant: {valid}\r\n")
    assert status == 101
    status, _ = await _peer_upgrade(pair.a, f"X-Cxg-Peer-Grant: {valid}\r\n")
    assert status == 401
    # A valid grant for an epoch A does not hold: 409, and nothing started for it.
    stale = GrantSigner(PEER_SECRET).sign(
        workspace_id="ws_other", user_id="", epoch=EPOCH, pod="gw-a"
    )
    status, _ = await _peer_upgrade(pair.a, f"X-Cxg-Peer-Grant: {stale}\r\n")
    assert status == 409
    assert await pair.a_sessions() == ["ws_trust"]


async def test_the_internal_listener_serves_nothing_but_forwarded_upgrades(pair: Pair) -> None:
    host, port = pair.a.peer_addr.rsplit(":", 1)
    base = f"http://{host}:{port}"
    admin = {"Authorization": f"Bearer {ADMIN_SECRET}"}
    async with httpx2.AsyncClient(timeout=10) as http:
        for path in ("/healthz", "/readyz", "/metrics", "/admin/sessions", "/", "/codex-app/ws"):
            response = await http.get(base + path, headers=admin)
            assert response.status_code == 404, path
            assert "cxg_" not in response.text
        response = await http.post(
            base + "/admin/sessions/restart", json={"workspaceId": "x"}, headers=admin
        )
        assert response.status_code == 404
    # An upgrade on another path is not served either; a broken upgrade is a 400.
    valid = f"X-Cxg-Peer-Grant: {_grant('ws_x')}\r\n"
    assert (await _peer_upgrade(pair.a, valid, target="/admin/sessions"))[0] == 404
    status, _ = await _peer_upgrade(pair.a, valid + "Sec-WebSocket-Key: second\r\n")
    assert status == 400
    assert await pair.a_sessions() == []


def test_the_hop_request_carries_the_handshake_and_the_grant_only() -> None:
    head = parse_request_head(
        b"GET /codex-app/ws?x=1 HTTP/1.1\r\nHost: front\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nAuthorization: Bearer secret-token\r\nCookie: c=1\r\n"
        b"Origin: https://allowed.example\r\nSec-WebSocket-Key: a2V5a2V5a2V5a2V5a2V5aw==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: p1\r\nX-Cxg-Peer-Grant: fake\r\n"
        b"User-Agent: codex\r\n\r\n"
    )
    assert head is not None
    sent = hop_request(head, "10.0.0.7:8087", "v1.real.grant", "gw-b")
    forwarded = parse_request_head(sent)
    assert forwarded is not None
    assert forwarded.target == "/codex-app/ws?x=1"
    assert b"secret-token" not in sent and b"Cookie" not in sent and b"Origin" not in sent
    grants = [v for k, v in forwarded.headers if k == "x-cxg-peer-grant"]
    assert grants == ["v1.real.grant"]  # the client's own "grant" header is dropped
    assert forwarded.header("sec-websocket-protocol") == "p1"
    assert forwarded.header("sec-websocket-key") == "a2V5a2V5a2V5a2V5a2V5aw=="


# -- backpressure ---------------------------------------------------------------------------------


async def test_a_stalled_owner_holds_forwarded_senders_back_without_buffering_on_b(
    launch_pair: LaunchPair,
) -> None:
    budget = 8 << 20
    pair = await launch_pair(
        {"ECHO_BINARY": "1"}, CXG_WS_MAX_MESSAGE_SIZE="4MiB", CXG_WS_INFLIGHT_BUDGET="8MiB"
    )
    pair.own("ws_stalled")
    async with connect(pair.b.gateway, "ws_stalled") as rpc:
        pid = int((await rpc.result("fake/pid"))["pid"])
        blob = os.urandom(4 << 20)
        writers: list[RawClient] = []
        sent = [0]
        for _ in range(6):
            head, client = await _raw_connect(pair.b, "ws_stalled")
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
                # 6 clients x 4 frames of 4 MiB = 96 MiB offered through B; A's child reads
                # nothing. A's budget fills (and is never exceeded) ...
                with trio.fail_after(20):
                    while (held := await _metric(pair.a, "cxg_ws_inflight_bytes")) < len(blob):
                        assert held <= budget
                        await trio.sleep(0.02)
                # ... and B, which holds one read buffer per direction, passes the stall on:
                # most of what was offered is still with the senders.
                assert await _metric(pair.a, "cxg_ws_inflight_bytes") <= budget
                assert sent[0] < 6 * 4
                os.kill(pid, signal.SIGCONT)
                with trio.fail_after(60):
                    for client in writers:
                        for _ in range(4):
                            opcode, payload = await client.receive()
                            assert opcode == frames.BINARY and payload == blob
        finally:
            os.kill(pid, signal.SIGCONT)
        for client in writers:
            await client.stream.aclose()


async def test_a_client_that_stops_reading_does_not_make_b_buffer(launch_pair: LaunchPair) -> None:
    # The child may queue every echo (its own memory); what is checked is B's.
    pair = await launch_pair({"ECHO_BINARY": "1", "OUTBOUND_CAP": "1000"})
    pair.own("ws_no_reader")
    host, port = _address(pair.b)
    sock = trio.socket.socket()
    # A small receive buffer on the client: what B holds for it must then stay within B's own
    # send buffer and one read buffer, not grow with what the owner sends.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await sock.connect((host, port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(upgrade_request(host, port, token_for("ws_no_reader"), key))
    head, rest = await read_head(stream)
    assert _status(head) == 101
    raw = RawClient(stream, rest)
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    bound = wmem_max + 4 * (64 * 1024) + (1 << 20)
    offered = 64
    blob = os.urandom(1 << 20)
    name = 'cxg_forwarded_bytes_total{direction="owner_to_client"}'
    before = await _metric(pair.b, name)
    with trio.fail_after(60):
        for _ in range(offered):
            await raw.send(frames.BINARY, blob)
        # All 64 MiB of echoes are on their way; for two seconds, B must never take more of
        # them from the hop than it can hand to the client's stalled socket.
        with trio.move_on_after(2):
            while True:
                assert await _metric(pair.b, name) - before <= bound
                await trio.sleep(0.05)
        # The check was not idle: the echoes did reach B, as far as the client's socket let them.
        held = await _metric(pair.b, name) - before
        assert held > 2 * 64 * 1024
        assert offered * len(blob) > 4 * bound
        # Nothing was lost on the way: every echo arrives once the client reads.
        for _ in range(offered):
            assert await raw.receive() == (frames.BINARY, blob)
    await raw.stream.aclose()


async def test_an_internal_port_in_use_is_one_sentence_naming_the_variable(
    tmp_path: Path, s3_settings: S3Settings, fake_codex_bin: Path
) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = gateway_env(
            tmp_path,
            fake_codex_bin,
            **s3_env(s3_settings),
            CXG_POD_NAME="gw-a",
            CXG_PEER_ADDR=f"127.0.0.1:{port}",
            CXG_PEER_LISTEN_ADDR=f"127.0.0.1:{port}",
            CXG_PEER_SECRET=PEER_SECRET,
        )
        with trio.fail_after(TIMEOUT), pytest.raises(BindError) as refused:
            await run_daemon(load_config(env), stop=trio.Event())
    assert str(refused.value) == (
        f"cannot listen on 127.0.0.1:{port} (CXG_PEER_LISTEN_ADDR): Address already in use"
    )
