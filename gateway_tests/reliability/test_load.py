"""Load: many clients across many workspaces, each streaming numbered frames through its session.

Every client pipelines ``fake/echo`` requests carrying its own sequence number (with a bounded
window in flight, as an interactive client would never have thousands outstanding), and every
tenth frame is a binary frame echoed back byte for byte. Each connection must get back exactly
its own frames, each once, in the order sent: nothing dropped, duplicated, reordered or
crossed over from another client, text still text and binary still binary.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import pytest
import trio

from gateway_tests.fakes.launchers import make_fake_codex_launcher
from gateway_tests.harness import Rpc, connect, gateway_env, start_gateway
from gateway_tests.reliability.support import CountsRecorder

# Requests in flight per connection: well under the child's outbound queue of 128 messages.
WINDOW = 32
BINARY_EVERY = 10


@attrs.define
class ClientTally:
    """What one connection sent and got back."""

    client: int
    sent: int = 0
    received: list[int] = attrs.Factory(list)
    wrong_kind: int = 0
    foreign: int = 0

    def dropped(self) -> int:
        """Frames sent but never echoed."""
        return self.sent - len(set(self.received))

    def duplicated(self) -> int:
        """Frames echoed more than once."""
        return len(self.received) - len(set(self.received))

    def reordered(self) -> int:
        """Echoes that came before one sent earlier."""
        return sum(1 for a, b in zip(self.received, self.received[1:], strict=False) if b <= a)


def frame_for(client: int, seq: int) -> str | bytes:
    """The ``seq``-th frame of ``client``: a ``fake/echo`` request, or a binary frame."""
    if seq % BINARY_EVERY == BINARY_EVERY - 1:
        return f"bin:{client}:{seq}".encode()
    payload = {"client": client, "seq": seq, "pad": "x" * (seq % 97)}
    return json.dumps({"id": seq, "method": "fake/echo", "params": {"payload": payload}})


def decode_echo(message: str | bytes, tally: ClientTally) -> int:
    """The sequence number an echo carries; counts echoes of the wrong kind or client."""
    if isinstance(message, bytes):
        _, client, seq = message.decode().split(":")
        if int(seq) % BINARY_EVERY != BINARY_EVERY - 1:
            tally.wrong_kind += 1
    else:
        response = json.loads(message)
        payload = response["result"]["payload"]
        client, seq = payload["client"], payload["seq"]
        if response["id"] != seq or payload["pad"] != "x" * (seq % 97):
            tally.foreign += 1
        if seq % BINARY_EVERY == BINARY_EVERY - 1:
            tally.wrong_kind += 1
    if int(client) != tally.client:
        tally.foreign += 1
    return int(seq)


async def stream_frames(rpc: Rpc, tally: ClientTally, frames: int) -> None:
    """Send ``frames`` numbered frames with at most ``WINDOW`` in flight; read every echo."""
    window = trio.Semaphore(WINDOW)

    async def sender() -> None:
        for seq in range(frames):
            await window.acquire()
            await rpc.ws.send_message(frame_for(tally.client, seq))
            tally.sent += 1

    async def receiver() -> None:
        while len(tally.received) < frames:
            tally.received.append(decode_echo(await rpc.ws.get_message(), tally))
            window.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)


async def run_load(
    nursery: trio.Nursery,
    tmp_path: Path,
    counts: CountsRecorder,
    *,
    clients: int,
    workspaces: int,
    frames: int,
    within: float,
) -> None:
    """Run ``clients`` clients over ``workspaces`` workspaces, ``frames`` frames each; check all."""
    launcher = make_fake_codex_launcher(tmp_path / "bin", ECHO_BINARY="1")
    gateway = await start_gateway(
        nursery, gateway_env(tmp_path, launcher, CXG_MAX_SESSIONS=str(workspaces + 10))
    )
    tallies = [ClientTally(client=n) for n in range(clients)]
    pids: dict[str, set[int]] = {}
    started = trio.current_time()
    try:

        async def one_client(tally: ClientTally) -> None:
            workspace = f"ws_load_{tally.client % workspaces}"
            async with connect(gateway, workspace) as rpc:
                pid = (await rpc.result("fake/pid"))["pid"]
                pids.setdefault(workspace, set()).add(pid)
                await stream_frames(rpc, tally, frames)
                assert (await rpc.result("fake/pid"))["pid"] == pid

        with trio.fail_after(within):
            async with trio.open_nursery() as clients_nursery:
                for tally in tallies:
                    clients_nursery.start_soon(one_client, tally)
        elapsed = trio.current_time() - started
        sessions = await gateway.sessions()
    finally:
        await gateway.shutdown()

    counts["clients"] = clients
    counts["workspaces"] = workspaces
    counts["frames_per_client"] = frames
    counts["frames_sent"] = sum(t.sent for t in tallies)
    counts["frames_echoed"] = sum(len(t.received) for t in tallies)
    counts["dropped"] = sum(t.dropped() for t in tallies)
    counts["duplicated"] = sum(t.duplicated() for t in tallies)
    counts["reordered"] = sum(t.reordered() for t in tallies)
    counts["wrong_kind"] = sum(t.wrong_kind for t in tallies)
    counts["crossed_over"] = sum(t.foreign for t in tallies)
    counts["children"] = sum(len(p) for p in pids.values())
    counts["seconds"] = round(elapsed, 1)

    for tally in tallies:
        assert tally.received == list(range(frames)), f"client {tally.client} out of order"
        assert (tally.wrong_kind, tally.foreign) == (0, 0), tally.client
    assert counts.values["frames_echoed"] == clients * frames
    # One child per workspace for the whole run, every session still up at the end.
    assert all(len(p) == 1 for p in pids.values()) and len(pids) == workspaces
    assert len(sessions) == workspaces
    assert all(s["state"] == "running" for s in sessions)


async def test_fifty_clients_over_ten_workspaces_get_every_frame_once_and_in_order(
    nursery: trio.Nursery, tmp_path: Path, counts: CountsRecorder
) -> None:
    await run_load(nursery, tmp_path, counts, clients=50, workspaces=10, frames=200, within=90)


@pytest.mark.soak
async def test_two_hundred_clients_over_forty_workspaces_get_every_frame_once_and_in_order(
    nursery: trio.Nursery, tmp_path: Path, counts: CountsRecorder
) -> None:
    await run_load(nursery, tmp_path, counts, clients=200, workspaces=40, frames=3000, within=3600)
