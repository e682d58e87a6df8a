"""Finding and ending every process of a session, from /proc.

A session's processes are its child (the *leader*, started by ``child_process`` in a new session
and process group, as a child subreaper) and everything below it: codex's tool processes, its
MCP servers (``env-mcp``), whatever those start. Tools leave the leader's process group on their
own (codex 0.169.0 runs ``thread/shellCommand`` under ``setsid``; PTY tools do the same), and
backgrounded or double-forked processes lose their parent. Because the leader is a subreaper,
those orphans reparent to the leader, so while the leader lives its whole tree is found by
walking ``/proc/<pid>/task/*/children`` from it, whatever groups or sessions are in it.

``stop_process_tree`` ends a session:

1. SIGTERM to the leader's process group and to every process of its tree (the app-server
   drains its running turns); the tree is walked again every ``TREE_POLL_SECONDS`` while the
   leader is draining, so processes started meanwhile are known too.
2. After the leader exited, or after the grace: SIGKILL every known process and everything
   below them, round after round while new ones appear (a process with a pending SIGKILL can
   no longer fork), the leader last while it is alive so nothing escapes it; then SIGKILL to
   the group (safe: the leader is not reaped yet, so its pid cannot have been reused).
3. What can still have escaped (a process that left the group, forked in the last poll
   interval before the leader died, or the tree of a leader that crashed) is found by a scan of
   /proc for processes whose ``CODEX_HOME``, working directory or executable is inside the
   session's directory, or whose session id is the leader's.
4. Wait (bounded) until every one of them is gone, then reap the leader.

Every signal to a process other than our child goes through a pidfd opened after checking the
process's start time, so a pid reused meanwhile is never signalled. Residual risk, documented
in docs/reliability.md: a process that, within the last poll interval before its leader died,
double-forked, called ``setsid``, changed directory out of the session and cleared its
environment. cgroups would close that gap but are not writable by an unprivileged pod.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import attrs
import structlog
import trio

from gateway.sessions.child_process import ChildProcess

log = structlog.get_logger(__name__)

TREE_POLL_SECONDS = 0.1
# SIGKILL rounds are repeated while new processes appear; a fork bomb is bounded by this.
MAX_KILL_ROUNDS = 50
# How long killed processes (not our children: init or tini reaps them) may take to vanish.
EXIT_TIMEOUT_SECONDS = 5.0
_EXIT_POLL_SECONDS = 0.01


@attrs.frozen
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` this module uses."""

    pid: int
    state: str
    ppid: int
    pgid: int
    sid: int
    start_time: int

    @property
    def alive(self) -> bool:
        """Not yet exited (a zombie has exited; only its parent's wait is missing)."""
        return self.state not in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcStat(
        pid=pid,
        state=fields[0],
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        sid=int(fields[3]),
        start_time=int(fields[19]),
    )


def children_of(pid: int) -> list[int]:
    """The direct children of every thread of ``pid``."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(int(child) for child in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def all_pids() -> Iterator[int]:
    """Every process id visible in /proc."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + os.sep)


def belongs_to_root(pid: int, root: Path) -> tuple[str, str] | None:
    """Why process ``pid`` belongs to the directory ``root``: (``CODEX_HOME``|cwd|exe, path).

    ``root`` must be resolved. Processes that cannot be read (another uid) do not match.
    """
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        environ = b""
    for entry in environ.split(b"\0"):
        if entry.startswith(b"CODEX_HOME="):
            home = entry[len(b"CODEX_HOME=") :].decode("utf-8", "replace")
            if _under(home, root):
                return "CODEX_HOME", home
    for link in ("cwd", "exe"):
        try:
            target = os.readlink(f"/proc/{pid}/{link}").removesuffix(" (deleted)")
        except OSError:
            continue
        if _under(target, root):
            return link, target
    return None


def signal_process(pid: int, start_time: int, sig: int) -> bool:
    """Send ``sig`` to ``pid`` if it is still the process that started at ``start_time``."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        # The pidfd pins the process: if its start time still matches, it is the same one.
        stat = read_stat(pid)
        if stat is None or stat.start_time != start_time or not stat.alive:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        os.close(pidfd)


class SessionTree:
    """The processes of one session, as far as they have been seen (pid → start time)."""

    def __init__(self, leader: ChildProcess, directory: Path | None) -> None:
        self.leader = leader
        self.directory = directory.resolve() if directory is not None else None
        self.members: dict[int, int] = {}

    def _add(self, pids: Iterable[int]) -> list[int]:
        new = []
        for pid in pids:
            if pid == self.leader.pid or pid in self.members:
                continue
            stat = read_stat(pid)
            if stat is not None and stat.alive:
                self.members[pid] = stat.start_time
                new.append(pid)
        return new

    def refresh(self) -> list[int]:
        """Walk down from the leader and every live member; return the processes new to us."""
        found: list[int] = []
        frontier = [self.leader.pid, *self.live()]
        seen = set(frontier)
        while frontier:
            below = [pid for parent in frontier for pid in children_of(parent) if pid not in seen]
            seen.update(below)
            found.extend(self._add(below))
            frontier = below
        return found

    def scan_escaped(self) -> list[int]:
        """Scan all of /proc for processes of this session the walk cannot reach any more."""
        found: list[int] = []
        me = os.getpid()
        for pid in all_pids():
            if pid in (me, self.leader.pid) or pid in self.members:
                continue
            stat = read_stat(pid)
            if stat is None or not stat.alive:
                continue
            if (
                stat.sid == self.leader.pid
                or stat.pgid == self.leader.pid
                or (self.directory is not None and belongs_to_root(pid, self.directory))
            ):
                found.extend(self._add([pid]))
        return found

    def live(self) -> list[int]:
        """Known members that have not exited."""
        alive = []
        for pid, start_time in self.members.items():
            stat = read_stat(pid)
            if stat is not None and stat.alive and stat.start_time == start_time:
                alive.append(pid)
        return alive

    def signal_members(self, sig: int, pids: Iterable[int] | None = None) -> None:
        """Signal members (all known ones by default), never a reused pid."""
        for pid in self.members if pids is None else pids:
            signal_process(pid, self.members[pid], sig)

    def signal_group(self, sig: int) -> None:
        """Signal the leader's process group; only while the leader is not reaped."""
        if self.leader.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.leader.pid, sig)


async def stop_process_tree(process: ChildProcess, grace: float, directory: Path | None) -> int:
    """End ``process`` and every process of its session; return its exit status.

    See the module docstring for the order. Shielded: cancellation never leaves a process
    behind. ``directory`` is the session's directory, for finding escaped processes.
    """
    with trio.CancelScope(shield=True):
        tree = SessionTree(process, directory)
        if not process.exited:
            tree.refresh()
            tree.signal_group(signal.SIGTERM)
            tree.signal_members(signal.SIGTERM)
            with trio.move_on_after(grace):
                while not process.exited:
                    with trio.move_on_after(TREE_POLL_SECONDS):
                        await process.wait_exited()
                    tree.signal_members(signal.SIGTERM, tree.refresh())
        if not process.exited:
            log.warning("child.kill_after_grace", pid=process.pid, grace_seconds=grace)
        await _kill_tree(tree)
        if tree.directory is not None:
            escaped = await trio.to_thread.run_sync(tree.scan_escaped)
            if escaped:
                log.warning("child.escaped_processes_killed", pid=process.pid, pids=escaped)
                tree.signal_members(signal.SIGKILL, escaped)
                await _kill_tree(tree)
        with trio.move_on_after(EXIT_TIMEOUT_SECONDS):
            while tree.live():  # noqa: ASYNC110 - no event tells us another parent reaped them
                await trio.sleep(_EXIT_POLL_SECONDS)
        survivors = tree.live()
        if survivors:
            log.error("child.processes_survived", pid=process.pid, pids=survivors)
        status = process.reap()
        log.info("child.stopped", pid=process.pid, status=status, processes_ended=len(tree.members))
    return status


async def _kill_tree(tree: SessionTree) -> None:
    """SIGKILL the whole known tree, rounds until nothing new appears, the leader last."""
    for _ in range(MAX_KILL_ROUNDS):
        new = tree.refresh()
        tree.signal_members(signal.SIGKILL)
        if not new:
            break
        await trio.lowlevel.checkpoint()
    if not tree.leader.exited:
        tree.leader.kill()
        await tree.leader.wait_exited()
        # Children the leader had not yet been told about were reparented when it died.
        tree.signal_members(signal.SIGKILL, tree.refresh())
    tree.signal_group(signal.SIGKILL)


@attrs.frozen
class Leftover:
    """A process of an earlier daemon's session, found under the session root at start."""

    pid: int
    start_time: int
    name: str
    reason: str
    path: str


def find_leftovers(tmp_root: Path) -> list[Leftover]:
    """Processes whose ``CODEX_HOME``, working directory or executable is under ``tmp_root``."""
    root = tmp_root.resolve()
    me = {os.getpid(), os.getppid()}
    found = []
    for pid in all_pids():
        if pid in me:
            continue
        stat = read_stat(pid)
        if stat is None or not stat.alive:
            continue
        match = belongs_to_root(pid, root)
        if match is None:
            continue
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            name = "?"
        found.append(Leftover(pid, stat.start_time, name, match[0], match[1]))
    return found


def end_leftover_processes(tmp_root: Path) -> list[Leftover]:
    """SIGKILL every leftover process under ``tmp_root`` and wait (bounded) until they are gone.

    Run at start, before any session directory is adopted or set aside: a child of a daemon
    that was SIGKILLed (or a grandchild that outlived that child) must not keep writing into a
    directory the new daemon is about to move or restore into. Blocking; call it in a thread.
    """
    leftovers = find_leftovers(tmp_root)
    ended = [p for p in leftovers if signal_process(p.pid, p.start_time, signal.SIGKILL)]
    deadline = time.monotonic() + EXIT_TIMEOUT_SECONDS
    for leftover in ended:
        while time.monotonic() < deadline:
            stat = read_stat(leftover.pid)
            if stat is None or not stat.alive or stat.start_time != leftover.start_time:
                break
            time.sleep(_EXIT_POLL_SECONDS)
    return ended
