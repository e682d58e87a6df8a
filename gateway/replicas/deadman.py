"""The dead man's switch of a replica: a keeper process that kills this pod's children in time.

An owner must stop its children before any peer may judge it dead and start the same
workspaces elsewhere (docs/operations.md, "Node loss"). The daemon fences itself when its
heartbeat cannot be renewed, but a daemon that is *paused* (SIGSTOP, a frozen cgroup, a VM
stall) runs no code at all, and its children keep running: every thread of a stopped process
stops, so a thread cannot be the safeguard. The keeper is a separate process:

* it keeps its own deadline on ``CLOCK_MONOTONIC`` (shared by every process of the machine);
* the daemon moves the deadline on with ``Deadman.pet`` after each renewed heartbeat, and
  names the process groups (and uids) of its children with ``watch`` / ``unwatch``;
* when the deadline passes without a pet, it SIGKILLs every watched process group, the tree
  below each group leader, and, with a uid, every process of that uid (the reaping helper of
  ``gateway/sessions/isolation.py``); then it reports ``fired`` and the daemon fences
  (``SessionManager.fence_all``). Watches that arrive while the deadline is past are killed at
  once;
* it ends with the daemon, whatever ends the daemon: its parent-death signal is SIGKILL, and
  EOF on its pipe (the daemon closed it, or died) ends it too. It ignores SIGTERM, SIGINT and
  SIGHUP, and runs in its own session, so a signal meant for the daemon's group (a drain) does
  not take away the safeguard.

It holds no secret: it is started with an empty environment, and the only thing it reads is
its pipe. Messages on the pipe are JSON lines of at most ``MAX_LINE`` bytes; anything else is
refused (reported, never acted on), so a malformed message kills nothing.

Residual window: ``pet(seconds_left)`` counts from when it is called; a pause between the
heartbeat write it follows and the call is not seen (the heartbeat writer keeps that window to a
few instructions).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import structlog
import trio

from gateway.sessions.child_process import ChildProcess, start_child_process
from gateway.sessions.isolation import IsolationError, UidRange, kill_every_process_of
from gateway.sessions.process_tree import children_of, read_stat, signal_process

log = structlog.get_logger(__name__)

# One message on the pipe, either way, newline included.
MAX_LINE = 4096
# Watched process groups at once (a pod runs at most CXG_MAX_SESSIONS children).
MAX_WATCHED = 10_000
# A pet may move the deadline at most this far ahead.
MAX_AHEAD_SECONDS = 24 * 3600.0
MAX_KEY_LENGTH = 256
# SIGKILL rounds over a group's tree while new processes appear (a dying tree cannot fork).
KILL_ROUNDS = 5
# How long the keeper may take to say it is ready, and to exit once its pipe is closed.
KEEPER_START_SECONDS = 30.0
KEEPER_EXIT_SECONDS = 5.0


class ProtocolError(Exception):
    """A message on the keeper's pipe that it refuses; the message says why."""


class KeeperLost(Exception):
    """The keeper process ended while the daemon still relied on it."""


@attrs.frozen
class Pet:
    """Nothing is killed before ``until`` (``CLOCK_MONOTONIC`` seconds)."""

    until: float


@attrs.frozen
class Watch:
    """Kill process group ``pgid`` (and every process of ``uid``) when the deadline passes."""

    key: str
    pgid: int
    uid: int | None


@attrs.frozen
class Unwatch:
    """Forget ``key``."""

    key: str


Message = Pet | Watch | Unwatch


@attrs.frozen
class Limits:
    """What the keeper may be asked to kill: never itself, its parent, root or its own uid."""

    own_pid: int
    own_pgid: int
    parent_pid: int
    parent_pgid: int
    own_uid: int
    uid_range: UidRange | None = None


def parse_message(line: bytes, limits: Limits, now: float) -> Message:
    """One pipe message (without its newline), checked against ``limits``; pure.

    Raises ``ProtocolError`` for anything that is not exactly a well-formed pet, watch or
    unwatch within the limits.
    """
    if len(line) >= MAX_LINE:
        raise ProtocolError(f"message longer than {MAX_LINE} bytes")
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("message is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    op = message.get("op")
    fields = set(message)
    if op == "pet" and fields == {"op", "until"}:
        until = message["until"]
        if isinstance(until, bool) or not isinstance(until, int | float):
            raise ProtocolError("pet: until must be a number")
        if not math.isfinite(until) or until > now + MAX_AHEAD_SECONDS:
            raise ProtocolError(
                f"pet: until must be finite and at most {MAX_AHEAD_SECONDS:g}s ahead"
            )
        return Pet(until=float(until))
    if op in ("watch", "unwatch"):
        key = message.get("key")
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise ProtocolError(f"{op}: key must be a string of 1 to {MAX_KEY_LENGTH} characters")
        if op == "unwatch":
            if fields != {"op", "key"}:
                raise ProtocolError("unwatch takes op and key only")
            return Unwatch(key=key)
        if fields != {"op", "key", "pgid", "uid"}:
            raise ProtocolError("watch takes op, key, pgid and uid only")
        pgid, uid = message["pgid"], message["uid"]
        if isinstance(pgid, bool) or not isinstance(pgid, int) or pgid <= 1:
            raise ProtocolError("watch: pgid must be a process group id above 1")
        if pgid in (limits.own_pid, limits.own_pgid, limits.parent_pid, limits.parent_pgid):
            raise ProtocolError(f"watch: pgid {pgid} is the keeper's or the daemon's own")
        if uid is not None:
            if isinstance(uid, bool) or not isinstance(uid, int) or uid <= 0:
                raise ProtocolError("watch: uid must be null or a positive uid")
            if uid == limits.own_uid:
                raise ProtocolError(f"watch: uid {uid} is the daemon's own")
            if limits.uid_range is not None and uid not in limits.uid_range:
                raise ProtocolError(
                    f"watch: uid {uid} is outside the child uid range "
                    f"{limits.uid_range.first}-{limits.uid_range.last}"
                )
        return Watch(key=key, pgid=pgid, uid=uid)
    raise ProtocolError("message must be a pet, a watch or an unwatch")


# -- the keeper process ---------------------------------------------------------------------


@attrs.define
class _Watched:
    pgid: int
    uid: int | None
    # The group leader's start time when it was watched: a pid reused since is never signalled.
    leader_start: int | None
    killed: bool = False


class Keeper:
    """The keeper's state: its deadline and what it watches; see the module docstring.

    ``report`` writes one JSON line to the daemon.
    """

    def __init__(self, until: float, limits: Limits, report: Any) -> None:
        self.until = until
        self.limits = limits
        self._report = report
        self.watched: dict[str, _Watched] = {}
        self.expired = False

    def handle(self, line: bytes) -> None:
        """Act on one message; a refused one is reported and changes nothing."""
        try:
            message = parse_message(line, self.limits, time.monotonic())
            if isinstance(message, Watch) and (
                message.key not in self.watched and len(self.watched) >= MAX_WATCHED
            ):
                raise ProtocolError(f"watch: {MAX_WATCHED} groups are watched already")
        except ProtocolError as exc:
            self._report({"event": "refused", "error": str(exc)})
            return
        if isinstance(message, Pet):
            self.until = message.until
            if time.monotonic() < self.until:
                self.expired = False
        elif isinstance(message, Watch):
            stat = read_stat(message.pgid)
            self.watched[message.key] = _Watched(
                message.pgid, message.uid, stat.start_time if stat is not None else None
            )
            if self.expired:
                # The deadline is past: nothing new may run either.
                self._kill(message.key)
                self._report({"event": "fired", "keys": [message.key]})
        else:
            self.watched.pop(message.key, None)

    def check_deadline(self) -> None:
        """Kill everything watched once the deadline has passed (once per expiry)."""
        if self.expired or time.monotonic() < self.until:
            return
        self.expired = True
        keys = [key for key, watched in self.watched.items() if not watched.killed]
        for key in keys:
            self._kill(key)
        self._report({"event": "fired", "keys": keys})

    def _kill(self, key: str) -> None:
        watched = self.watched[key]
        watched.killed = True
        kill_group(watched.pgid, watched.leader_start)
        if watched.uid is not None:
            try:
                if not kill_every_process_of(watched.uid):
                    self._report({"event": "uid_kill_failed", "uid": watched.uid})
            except IsolationError as exc:
                self._report({"event": "uid_kill_failed", "uid": watched.uid, "error": str(exc)})

    def seconds_left(self) -> float | None:
        """How long to wait for a message before the deadline; ``None`` once it has passed."""
        if self.expired:
            return None
        return max(0.0, self.until - time.monotonic())


def kill_group(pgid: int, leader_start: int | None) -> None:
    """SIGKILL process group ``pgid`` and the tree below its leader (a subreaper's orphans).

    A pid that now belongs to a process other than the leader seen at ``watch`` (started later,
    or no leader was seen) is not the watched group's: it is left alone. A leader that is gone
    leaves the group's other members, which ``killpg`` still reaches (their group id cannot be
    reused while they live).
    """
    leader = read_stat(pgid)
    if leader is not None and leader.start_time != leader_start:
        return
    tree: dict[int, int] = {}
    for _ in range(KILL_ROUNDS):
        frontier = [pgid, *tree]
        new: dict[int, int] = {}
        for parent in frontier:
            for pid in children_of(parent):
                stat = read_stat(pid)
                if pid not in tree and stat is not None and stat.alive:
                    new[pid] = stat.start_time
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        for pid, start in new.items():
            signal_process(pid, start, signal.SIGKILL)
        tree.update(new)
        if not new:
            break


def run_keeper(fd: int, keeper: Keeper) -> int:
    """Read messages from ``fd`` until EOF, keeping the deadline; blocking. Returns 0."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    buffer = b""
    discarding = False
    while True:
        keeper.check_deadline()
        left = keeper.seconds_left()
        timeout_ms = None if left is None else math.ceil(left * 1000)
        if not poller.poll(timeout_ms):
            continue
        data = os.read(fd, 65536)
        if not data:
            return 0  # the daemon closed the pipe, or died
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if discarding:
                discarding = False
                continue
            keeper.handle(line)
        if len(buffer) >= MAX_LINE:
            if not discarding:
                keeper.handle(buffer)  # refused as too long
            buffer, discarding = b"", True


def keeper_main(argv: list[str]) -> int:
    """``python -m gateway.replicas.deadman UNTIL [FIRST-LAST]``: the keeper process."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    until = float(argv[0])
    uid_range = None
    if len(argv) > 1:
        first, last = argv[1].split("-")
        uid_range = UidRange(int(first), int(last))
    parent = os.getppid()
    limits = Limits(
        own_pid=os.getpid(),
        own_pgid=os.getpgid(0),
        parent_pid=parent,
        parent_pgid=os.getpgid(parent),
        own_uid=os.getuid(),
        uid_range=uid_range,
    )
    out = sys.stdout.buffer

    def report(event: dict[str, Any]) -> None:
        out.write(json.dumps(event).encode() + b"\n")
        out.flush()

    report({"event": "ready", "pid": os.getpid()})
    try:
        return run_keeper(sys.stdin.fileno(), Keeper(until, limits, report))
    except BrokenPipeError:
        return 0  # the daemon is gone


# -- the daemon's side ----------------------------------------------------------------------


class Deadman:
    """The daemon's handle on its keeper; see the module docstring.

    ``fired`` is set when the keeper reports that its deadline passed (it has killed what it
    watched); the first ``pet`` after that replaces it with a fresh event, so wait on
    ``deadman.fired`` again (read the attribute anew) for the next time.
    """

    def __init__(self, process: ChildProcess, pipe: int) -> None:
        self.fired = trio.Event()
        self.keeper_pid = process.pid
        self._process = process
        self._pipe: int | None = pipe
        self._closing = False

    def pet(self, seconds_left: float) -> None:
        """Nothing is killed for ``seconds_left`` seconds from now."""
        if not math.isfinite(seconds_left):
            raise ValueError(f"seconds_left must be finite, got {seconds_left!r}")
        self._send({"op": "pet", "until": time.monotonic() + seconds_left})
        if self.fired.is_set():
            self.fired = trio.Event()

    def watch(self, key: str, *, pgid: int, uid: int | None) -> None:
        """Kill process group ``pgid`` (and every process of ``uid``) if the deadline passes."""
        self._send({"op": "watch", "key": key, "pgid": pgid, "uid": uid})

    def unwatch(self, key: str) -> None:
        """Stop watching ``key`` (its processes are gone)."""
        self._send({"op": "unwatch", "key": key})

    def _send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message).encode() + b"\n"
        if self._pipe is None:
            log.error("deadman.closed", op=message["op"])
            return
        try:
            # Shorter than PIPE_BUF: written whole or not at all.
            os.write(self._pipe, line)
        except BlockingIOError:
            # The keeper is not reading; a lost pet only makes it fire sooner.
            log.error("deadman.pipe_full", op=message["op"])
        except OSError as exc:
            log.error("deadman.keeper_unreachable", op=message["op"], error=str(exc))

    async def _read_reports(self, *, task_status: trio.TaskStatus[None]) -> None:
        stream = self._process.stdout
        assert stream is not None
        buffer = b""
        ready = False
        while True:
            data = await stream.receive_some(65536)
            if not data:
                if self._closing:
                    return
                raise KeeperLost(
                    f"the replica keeper process {self.keeper_pid} exited; this pod can no "
                    "longer stop its children when it is paused, so it stops too"
                )
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                report = json.loads(line)
                event = report.get("event")
                if event == "ready" and not ready:
                    ready = True
                    task_status.started()
                elif event == "fired":
                    log.error("deadman.fired", keys=report.get("keys", []))
                    self.fired.set()
                else:
                    log.error("deadman.report", report=report)
            if len(buffer) > MAX_LINE:
                raise KeeperLost("the replica keeper sent a report longer than expected")

    def _close(self) -> None:
        self._closing = True
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None


def keeper_argv(until: float, uid_range: UidRange | None) -> list[str]:
    """How the keeper is started: this interpreter, isolated from the environment."""
    argv = [sys.executable, "-I", "-m", "gateway.replicas.deadman", repr(until)]
    if uid_range is not None:
        argv.append(f"{uid_range.first}-{uid_range.last}")
    return argv


@asynccontextmanager
async def open_deadman(
    *, first_deadline: float, uid_range: UidRange | None = None
) -> AsyncIterator[Deadman]:
    """Start the keeper; nothing is killed before ``first_deadline`` (``trio.current_time()``).

    ``uid_range``: the child uids the keeper may be asked to kill (``CXG_CHILD_UID_RANGE``);
    without it any uid but root's and the daemon's own. On exit the pipe is closed and the
    keeper ends (it is killed if it does not within ``KEEPER_EXIT_SECONDS``).
    """
    until = time.monotonic() + (first_deadline - trio.current_time())
    read_end, write_end = os.pipe()
    try:
        process = start_child_process(
            keeper_argv(until, uid_range),
            stdin=read_end,
            stdout=subprocess.PIPE,
            env={},
            cwd="/",
            start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    os.set_blocking(write_end, False)
    deadman = Deadman(process, write_end)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(KEEPER_START_SECONDS):
                await nursery.start(deadman._read_reports)
            log.info("deadman.started", pid=process.pid)
            yield deadman
            deadman._close()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            deadman._close()
            with trio.move_on_after(KEEPER_EXIT_SECONDS):
                await process.wait_exited()
            process.kill()
            await process.wait_exited()
            process.reap()


if __name__ == "__main__":
    sys.exit(keeper_main(sys.argv[1:]))
