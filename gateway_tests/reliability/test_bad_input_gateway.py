"""Bad input through the running gateway, property-based, while another client stays attached.

* Authorization headers: any bytes (one header line, so no CR/LF), any text, forged and
  malformed tokens, with the HMAC and the agentserver authenticators both configured — the
  upgrade gets 401, 400 or 503 and nothing else, no session starts, and the attached client
  elsewhere keeps working after every example.
* WebSocket frames: any text and binary frames, some just under and over the message limit —
  each is relayed (binary echoed byte for byte, text carried verbatim) or its client is closed
  with 1009; the session's child is never restarted and the attached client keeps working.

Hypothesis drives the examples from a worker thread; each example runs on the test's Trio loop
through ``trio.from_thread.run``, so one daemon serves every example.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, connect_websocket_url

from gateway_tests.fakes.fake_agentserver import FakeAgentserver
from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import (
    HMAC_SECRET,
    MAX_MESSAGE,
    LaunchGateway,
    Rpc,
    RunningGateway,
    connect,
    token_for,
)
from gateway_tests.reliability.support import CountsRecorder, Scale, bounded

LIMIT = 16 * 1024
BYSTANDER = "ws_bystander"


def run_examples(test: Callable[[], None]) -> Awaitable[None]:
    """Run a hypothesis test in a worker thread (its examples call back into Trio)."""
    return trio.to_thread.run_sync(test)


async def upgrade_status(gateway: RunningGateway, authorization: bytes | None) -> int:
    """Send a WebSocket upgrade with this raw Authorization value; return the status code."""
    host, port = gateway.http_url.removeprefix("http://").split(":")
    request = (
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    )
    if authorization is not None:
        request += b"Authorization: " + authorization + b"\r\n"
    request += b"\r\n"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request)
            head = b""
            while b"\r\n" not in head:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
    status_line = head.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), head[:200]
    return int(status_line.split()[1])


async def still_works(rpc: Rpc, pid: int, marker: int) -> None:
    """The attached client's session answers, on the same child."""
    reply = await rpc.result("fake/echo", {"payload": marker})
    assert reply["payload"] == marker
    assert (await rpc.result("fake/pid"))["pid"] == pid


header_values = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.binary(max_size=300).map(lambda b: b"Bearer " + b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=200).map(lambda t: ("Bearer " + t).encode("utf-8", "surrogatepass")),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from(["bearer ", "Bearer", "Bearer  ", "Basic abc", "Bearer ast_x_y"]).map(
        str.encode
    ),
    # HMAC-shaped forgeries: right shape, wrong signature or tampered workspace.
    st.builds(
        lambda ws, sig: f"Bearer {ws}.dev.{sig}".encode(),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True),
        st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
    ),
    st.builds(lambda n: f"Bearer {token_for(BYSTANDER)[:-n]}".encode(), st.integers(1, 70)),
    st.just(b"Bearer " + b"a" * 5000),
)


async def test_any_authorization_header_gets_401_400_or_503_and_bothers_nobody(
    launch_gateway: LaunchGateway, nursery: trio.Nursery, counts: CountsRecorder, scale: Scale
) -> None:
    agentserver = FakeAgentserver(internal_secret="internal")
    url: str = await nursery.start(agentserver.serve)
    gateway = await launch_gateway(
        CXG_AGENTSERVER_INTERNAL_URL=url, CXG_AGENTSERVER_INTERNAL_SECRET="internal"
    )
    statuses: dict[int, int] = {}
    try:
        async with connect(gateway, BYSTANDER) as bystander:
            pid = (await bystander.result("fake/pid"))["pid"]
            examples = [0]

            @bounded(scale.pick(150, 3000), suppress=list(HealthCheck))
            @given(value=header_values | st.none())
            def header_property(value: bytes | None) -> None:
                if value is not None and HMAC_SECRET.encode() in value:
                    return
                status = trio.from_thread.run(upgrade_status, gateway, value)
                statuses[status] = statuses.get(status, 0) + 1
                assert status in (400, 401, 503), (value, status)
                examples[0] += 1
                trio.from_thread.run(still_works, bystander, pid, examples[0])

            await run_examples(header_property)
            sessions = await gateway.sessions()
    finally:
        await gateway.shutdown()
    counts["examples"] = sum(statuses.values())
    for status, number in sorted(statuses.items()):
        counts[f"status_{status}"] = number
    counts["bystander_checks_ok"] = examples[0]
    counts["sessions_started_by_bad_headers"] = len(sessions) - 1
    assert [s["workspaceId"] for s in sessions] == [BYSTANDER]


frames = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    st.integers(LIMIT - 4, LIMIT + 4).map(lambda n: "t" * n),
    st.integers(LIMIT - 4, LIMIT + 4).map(lambda n: b"\xff" * n),
    st.integers(1, 3 * LIMIT).map(lambda n: "é" * n),
    st.binary(min_size=LIMIT + 1, max_size=LIMIT + 64),
)


async def test_any_frame_is_relayed_or_closes_only_its_client_with_1009(
    launch_gateway: LaunchGateway, tmp_path: Path, counts: CountsRecorder, scale: Scale
) -> None:
    launcher = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1")
    gateway = await launch_gateway(launcher, CXG_WS_MAX_MESSAGE_SIZE=f"{LIMIT}B")
    tally = {"relayed_text": 0, "relayed_binary": 0, "closed_1009": 0, "other_close": 0}
    workspace = "ws_frames"
    try:
        async with connect(gateway, BYSTANDER) as bystander, connect(gateway, workspace) as rpc:
            bystander_pid = (await bystander.result("fake/pid"))["pid"]
            pid = (await rpc.result("fake/pid"))["pid"]
            # Every child that answered for the workspace: one, unless a frame restarted it.
            children_seen = {pid}
            holder: dict[str, Any] = {"ws": rpc.ws, "id": 1000}

            async def fresh_client() -> None:
                holder["ws"] = await connect_websocket_url(
                    clients,
                    gateway.ws_url,
                    extra_headers=[(b"authorization", f"Bearer {token_for(workspace)}".encode())],
                    max_message_size=MAX_MESSAGE,
                )
                fresh = Rpc(holder["ws"])
                fresh._next_id = 10**8
                await fresh.initialize()

            async def probe(frame: str | bytes) -> None:
                ws = holder["ws"]
                # The limit counts bytes on the wire: UTF-8 bytes for text, as the child counts.
                size = len(frame.encode()) if isinstance(frame, str) else len(frame)
                oversized = size > LIMIT
                await ws.send_message(frame)
                if isinstance(frame, str) and not oversized:
                    # The raw text goes to the child (which drops what is not JSON-RPC); an
                    # echo of the same text proves it crosses the relay verbatim.
                    holder["id"] += 1
                    request = {
                        "id": holder["id"],
                        "method": "fake/echo",
                        "params": {"payload": frame},
                    }
                    if len(json.dumps(request)) <= LIMIT:
                        await ws.send_message(json.dumps(request))
                        with trio.fail_after(10):
                            while True:
                                reply = json.loads(await ws.get_message())
                                if reply.get("id") == holder["id"]:
                                    break
                            assert reply["result"]["payload"] == frame, reply
                    tally["relayed_text"] += 1
                elif isinstance(frame, bytes) and not oversized:
                    with trio.fail_after(10):
                        assert await ws.get_message() == frame
                    tally["relayed_binary"] += 1
                else:
                    with trio.fail_after(10):
                        try:
                            while True:
                                await ws.get_message()
                        except ConnectionClosed as closed:
                            code = closed.reason.code if closed.reason else None
                    if code == 1009:
                        tally["closed_1009"] += 1
                    else:
                        tally["other_close"] += 1
                    assert code == 1009
                    await fresh_client()
                await still_works(bystander, bystander_pid, holder["id"])
                ws_rpc = Rpc(holder["ws"])
                ws_rpc._next_id = 10**9 + holder["id"]
                children_seen.add((await ws_rpc.result("fake/pid"))["pid"])
                assert children_seen == {pid}, children_seen

            @bounded(scale.pick(120, 2000), suppress=list(HealthCheck))
            @given(frame=frames)
            def frame_property(frame: str | bytes) -> None:
                trio.from_thread.run(probe, frame)

            async with trio.open_nursery() as clients:
                await run_examples(frame_property)
                # The listing agrees: the session that took every frame runs its first child.
                entry = await gateway.session(workspace)
                assert entry is not None
                children_seen.add(entry["pid"])
                await holder["ws"].aclose()
                clients.cancel_scope.cancel()
    finally:
        await gateway.shutdown()
    for key, value in tally.items():
        counts[key] = value
    counts["child_restarts"] = len(children_seen) - 1
    assert tally["other_close"] == 0
    assert children_seen == {pid}
    assert sum(tally.values()) > 0, "no example ran"
