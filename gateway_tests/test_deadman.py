"""The replica keeper (gateway/replicas/deadman.py) with real processes and signals.

Victims are ``sleep`` processes this test starts in their own sessions; the keeper is the real
one (``python -I -m gateway.replicas.deadman``), started by ``open_deadman`` in this process or
in a stand-in daemon (``gateway_tests/deadman_host.py``) that the tests SIGSTOP and SIGKILL.
Every process a test starts is killed by the test's end whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from gateway.replicas.deadman import (
    MAX_LINE,
    Limits,
    Pet,
    ProtocolError,
    Unwatch,
    Watch,
    keeper_argv,
    kill_group,
    open_deadman,
    parse_message,
)
from gateway.sessions.isolation import UidRange
from gateway.sessions.process_tree import read_stat
from gateway_tests.harness import child_uid_range, eventually

REPO = Path(__file__).resolve().parent.parent
AS_ROOT = os.geteuid() == 0
# How long a victim may take to die once the keeper's deadline has passed.
KILL_WITHIN = 10.0


def uid_range_for_test() -> UidRange:
    first, last = child_uid_range().split("-")
    return UidRange(int(first), int(last))


@asynccontextmanager
async def victim(*, uid: int | None = None) -> AsyncIterator[trio.Process]:
    """A ``sleep`` in its own session (its pid is its group), killed at the end regardless."""
    options: dict[str, Any] = {"start_new_session": True}
    if uid is not None:
        options.update(user=uid, group=uid, extra_groups=[])
    process = await trio.lowlevel.open_process(
        ["sleep", "600"], stdin=subprocess.DEVNULL, **options
    )
    try:
        yield process
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def killed(process: trio.Process, *, within: float = KILL_WITHIN) -> int:
    """Wait for ``process`` to end; its exit status."""
    with trio.fail_after(within):
        return await process.wait()


async def gone(pid: int, *, within: float = KILL_WITHIN) -> None:
    """Wait until a process that is not our child has ended (its pidfd turns readable)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        with trio.fail_after(within):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -- the message format (pure) ----------------------------------------------------------------

LIMITS = Limits(
    own_pid=100, own_pgid=100, parent_pid=50, parent_pgid=40, own_uid=0, uid_range=UidRange(10, 20)
)


def test_well_formed_messages_parse() -> None:
    assert parse_message(b'{"op": "pet", "until": 12.5}', LIMITS, now=10.0) == Pet(until=12.5)
    assert parse_message(
        b'{"op": "watch", "key": "ws", "pgid": 4242, "uid": 15}', LIMITS, now=0
    ) == Watch(key="ws", pgid=4242, uid=15)
    assert parse_message(b'{"op": "watch", "key": "ws", "pgid": 4242, "uid": null}', LIMITS, 0) == (
        Watch(key="ws", pgid=4242, uid=None)
    )
    assert parse_message(b'{"op": "unwatch", "key": "ws"}', LIMITS, now=0) == Unwatch(key="ws")


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"op": "kill", "pgid": 4242}', "must be a pet"),
        (b'{"op": "pet"}', "must be a pet"),
        (b'{"op": "pet", "until": "soon"}', "until must be a number"),
        (b'{"op": "pet", "until": true}', "until must be a number"),
        (b'{"op": "pet", "until": 1e308}', "at most"),
        (b'{"op": "pet", "until": NaN}', "finite"),
        (b'{"op": "pet", "until": 1, "extra": 2}', "must be a pet"),
        (b'{"op": "watch", "key": "", "pgid": 4242, "uid": null}', "key must be"),
        (b'{"op": "watch", "key": "' + b"k" * 300 + b'", "pgid": 4242, "uid": null}', "key must"),
        (b'{"op": "watch", "key": "ws", "pgid": 1, "uid": null}', "above 1"),
        (b'{"op": "watch", "key": "ws", "pgid": -5, "uid": null}', "above 1"),
        (b'{"op": "watch", "key": "ws", "pgid": 0, "uid": null}', "above 1"),
        (b'{"op": "watch", "key": "ws", "pgid": 4242.0, "uid": null}', "above 1"),
        (b'{"op": "watch", "key": "ws", "pgid": 100, "uid": null}', "keeper's or the daemon's"),
        (b'{"op": "watch", "key": "ws", "pgid": 40, "uid": null}', "keeper's or the daemon's"),
        (b'{"op": "watch", "key": "ws", "pgid": 50, "uid": null}', "keeper's or the daemon's"),
        (b'{"op": "watch", "key": "ws", "pgid": 4242, "uid": 0}', "positive uid"),
        (b'{"op": "watch", "key": "ws", "pgid": 4242, "uid": 99}', "outside the child uid range"),
        (b'{"op": "watch", "key": "ws", "pgid": 4242}', "takes op, key, pgid and uid"),
        (b'{"op": "unwatch", "key": "ws", "pgid": 3}', "op and key only"),
        (b"x" * MAX_LINE, "longer than"),
    ],
)
def test_malformed_or_dangerous_messages_are_refused(line: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        parse_message(line, LIMITS, now=0.0)


def test_the_daemons_own_uid_is_refused() -> None:
    limits = Limits(own_pid=1000, own_pgid=1000, parent_pid=2, parent_pgid=2, own_uid=15)
    with pytest.raises(ProtocolError, match="daemon's own"):
        parse_message(b'{"op": "watch", "key": "ws", "pgid": 4242, "uid": 15}', limits, 0)


# -- the keeper in this process's hands ---------------------------------------------------------


async def test_a_watched_group_is_killed_when_the_pets_stop() -> None:
    async with victim() as target, open_deadman(first_deadline=trio.current_time() + 30) as deadman:
        deadman.watch("ws-a", pgid=target.pid, uid=None)
        deadman.pet(0.5)
        assert await killed(target) == -signal.SIGKILL
        with trio.fail_after(KILL_WITHIN):
            await deadman.fired.wait()


@pytest.mark.skipif(not AS_ROOT, reason="starting processes under another uid needs root")
async def test_a_process_of_a_watched_uid_that_left_the_group_is_killed_too() -> None:
    uids = uid_range_for_test()
    uid = uids.first
    async with (
        victim(uid=uid) as leader,
        # Its own session: not in the watched group, found only by its uid.
        victim(uid=uid) as escaped,
        victim(uid=uid + 1) as other_uid,
        open_deadman(first_deadline=trio.current_time() + 30, uid_range=uids) as deadman,
    ):
        assert os.getpgid(escaped.pid) != leader.pid
        deadman.watch("ws-b", pgid=leader.pid, uid=uid)
        deadman.pet(0.5)
        assert await killed(leader) == -signal.SIGKILL
        assert await killed(escaped) == -signal.SIGKILL
        with trio.fail_after(KILL_WITHIN):
            await deadman.fired.wait()
        # Another uid, in no watched group, is not touched.
        assert other_uid.poll() is None


async def test_without_a_uid_a_child_that_left_the_group_is_found_in_the_leaders_tree() -> None:
    leader = await trio.lowlevel.open_process(
        ["sh", "-c", "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!; wait"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert leader.stdout is not None
    escaped = 0
    try:
        with trio.fail_after(10):
            escaped = int((await _Lines(leader.stdout).next_raw()).decode())

        def left_the_group() -> bool:
            stat = read_stat(escaped)
            return stat is not None and stat.sid == escaped and stat.ppid == leader.pid

        # It has called setsid: its own session and group, still the leader's child.
        await eventually(left_the_group)
        async with open_deadman(first_deadline=trio.current_time() + 30) as deadman:
            deadman.watch("ws-tree", pgid=leader.pid, uid=None)
            deadman.pet(0.3)
            await gone(escaped)
            assert await killed(leader) == -signal.SIGKILL
    finally:
        leader.kill()
        with trio.CancelScope(shield=True):
            await leader.wait()
        if escaped and alive(escaped):
            os.kill(escaped, signal.SIGKILL)


async def test_nothing_is_killed_while_the_pets_continue() -> None:
    async with victim() as target, open_deadman(first_deadline=trio.current_time() + 1) as deadman:
        deadman.watch("ws-c", pgid=target.pid, uid=None)
        # Time passing is the behaviour under test: many deadlines' worth of pets.
        end = trio.current_time() + 3.0
        while trio.current_time() < end:
            deadman.pet(1.0)
            await trio.sleep(0.1)
        assert target.poll() is None
        assert not deadman.fired.is_set()


async def test_an_unwatched_group_is_left_alone_when_the_deadline_passes() -> None:
    async with (
        victim() as kept,
        victim() as target,
        open_deadman(first_deadline=trio.current_time() + 30) as deadman,
    ):
        deadman.watch("ws-d", pgid=kept.pid, uid=None)
        deadman.watch("ws-e", pgid=target.pid, uid=None)
        deadman.unwatch("ws-d")
        deadman.pet(0.2)
        assert await killed(target) == -signal.SIGKILL
        with trio.fail_after(KILL_WITHIN):
            await deadman.fired.wait()
        assert kept.poll() is None


async def test_a_group_watched_after_the_deadline_is_killed_at_once_and_a_pet_rearms() -> None:
    async with open_deadman(first_deadline=trio.current_time()) as deadman:
        with trio.fail_after(KILL_WITHIN):
            await deadman.fired.wait()
        async with victim() as late:
            deadman.watch("ws-f", pgid=late.pid, uid=None)
            assert await killed(late) == -signal.SIGKILL
        deadman.pet(30)
        assert not deadman.fired.is_set()
        async with victim() as safe:
            deadman.watch("ws-g", pgid=safe.pid, uid=None)
            # Re-armed: a new deadline, and a group watched now lives until it passes.
            deadman.pet(0.3)
            assert await killed(safe) == -signal.SIGKILL
            with trio.fail_after(KILL_WITHIN):
                await deadman.fired.wait()


async def test_the_keeper_gets_no_environment_and_ends_with_the_context() -> None:
    async with open_deadman(first_deadline=trio.current_time() + 30) as deadman:
        pid = deadman.keeper_pid
        assert Path(f"/proc/{pid}/environ").read_bytes() == b""
        assert os.getsid(pid) == pid  # its own session: the daemon's group signals miss it
        # A drain's SIGTERM (or a stray SIGINT, SIGHUP) does not take the safeguard away.
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(pid, signum)
        async with victim() as target:
            deadman.watch("ws-h", pgid=target.pid, uid=None)
            deadman.pet(0)
            assert await killed(target) == -signal.SIGKILL
        assert alive(pid)
    assert not alive(pid)


async def test_a_pid_reused_since_the_watch_is_never_signalled() -> None:
    async with victim() as target:
        stat = read_stat(target.pid)
        assert stat is not None
        # As if the watched leader had died and its pid gone to this newer process.
        kill_group(target.pid, leader_start=stat.start_time - 1)
        kill_group(target.pid, leader_start=None)
        assert target.poll() is None
        kill_group(target.pid, leader_start=stat.start_time)
        assert await killed(target) == -signal.SIGKILL


# -- the keeper's pipe, spoken to directly --------------------------------------------------


async def test_a_malformed_message_is_refused_and_kills_nothing() -> None:
    async with victim() as target:
        keeper = await trio.lowlevel.open_process(
            keeper_argv(time.monotonic() + 60, None),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={},
            cwd="/",
            start_new_session=True,
        )
        assert keeper.stdin is not None and keeper.stdout is not None
        reports = _Lines(keeper.stdout)
        try:
            with trio.fail_after(30):
                assert (await reports.next())["event"] == "ready"
                watch = {"op": "watch", "key": "ws", "pgid": target.pid, "uid": None}
                await keeper.stdin.send_all(json.dumps(watch).encode() + b"\n")
                bad = [
                    b"garbage\n",
                    b'{"op": "pet", "until": -1e999}\n',
                    # The test process's own group: never the keeper's to kill.
                    json.dumps(
                        {"op": "watch", "key": "x", "pgid": os.getpgid(0), "uid": None}
                    ).encode()
                    + b"\n",
                    b'{"op": "watch", "key": "y", "pgid": 1, "uid": null}\n',
                    b"z" * (3 * MAX_LINE) + b"\n",
                ]
                for line in bad:
                    await keeper.stdin.send_all(line)
                    report = await reports.next()
                    assert report["event"] == "refused", report
                # Still alive, still keeping its (distant) deadline; the victim untouched.
                assert target.poll() is None and keeper.poll() is None
                # And it still works: a pet in the past fires at once.
                past = {"op": "pet", "until": time.monotonic() - 1}
                await keeper.stdin.send_all(json.dumps(past).encode() + b"\n")
                assert await reports.next() == {"event": "fired", "keys": ["ws"]}
                assert await killed(target) == -signal.SIGKILL
                await keeper.stdin.aclose()
                assert await keeper.wait() == 0
        finally:
            keeper.kill()
            with trio.CancelScope(shield=True):
                await keeper.wait()


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next_raw(self) -> bytes:
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some(65536)
            assert data, "the stream ended"
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    async def next(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(await self.next_raw())
        return value


# -- a stand-in daemon that is paused or killed ---------------------------------------------


@asynccontextmanager
async def host(args: Sequence[str]) -> AsyncIterator[tuple[trio.Process, _Lines, int]]:
    """The stand-in daemon; yields it, its report lines and its keeper's pid."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gateway_tests.deadman_host", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        cwd=str(REPO),
    )
    assert process.stdout is not None
    lines = _Lines(process.stdout)
    keeper = 0
    try:
        with trio.fail_after(30):
            keeper = int((await lines.next())["keeper"])
        yield process, lines, keeper
    finally:
        with trio.CancelScope(shield=True):
            process.send_signal(signal.SIGCONT)
            process.kill()
            await process.wait()
            if keeper:
                await gone(keeper)


async def test_a_paused_daemons_children_are_killed_past_the_deadline() -> None:
    async with (
        victim() as target,
        host(
            [
                "--first", "30", "--pet-every", "0.1", "--seconds-left", "1.0",
                "--watch", f"ws:{target.pid}",
            ]
        ) as (daemon, lines, keeper),
    ):  # fmt: skip
        # Pets keep it alive while the daemon runs ...
        await trio.sleep(1.5)
        assert target.poll() is None
        # ... and once the daemon is paused, nothing pets; the keeper alone kills the child.
        daemon.send_signal(signal.SIGSTOP)
        stopped_at = trio.current_time()
        assert await killed(target) == -signal.SIGKILL
        assert trio.current_time() - stopped_at < 1.0 + KILL_WITHIN
        assert alive(keeper)
        daemon.send_signal(signal.SIGCONT)
        with trio.fail_after(KILL_WITHIN):
            assert await lines.next() == {"fired": True}


async def test_the_keeper_exits_when_the_daemon_is_sigkilled() -> None:
    async with host(["--first", "600", "--pet-every", "0"]) as (daemon, _, keeper):
        assert alive(keeper)
        daemon.kill()
        await daemon.wait()
        await gone(keeper)
