"""Each session's child under its own uid and gid: allocation, file ownership, reaping.

The operating system is the boundary between workspaces. Where the gateway may switch uids
(root, or the capabilities listed in ``REQUIRED_CAPABILITIES``), every session gets a uid from
``CXG_CHILD_UID_RANGE`` that no other live session of this daemon holds, with a private group
of the same number and no supplementary groups. Its directories are laid out so that:

* ``CXG_TMP_ROOT`` is ``0711`` and owned by the gateway: every child may pass through it to
  its own directory, none may list it;
* the session root ``<tmp root>/<workspace>`` is ``0710`` owned by the gateway and the
  session's group: only that child may pass through it, and only the gateway may create
  anything in it (restore staging and snapshot scratch space live there);
* ``codex-home``, ``home`` and ``run`` — and every file in them, config.toml and the
  model-token file included — are owned by the session's uid and gid, ``0700``/``0600``.

The gateway keeps writing (restores, config.toml, the model-token file) those files as root;
it reads a live home for snapshots with the child's own file ids (``reading_as``), so a link the
child swaps in mid-walk gets it nothing the child could not read itself. Archives never carry
a uid (``archive.py`` writes 0/0); restored files are handed to the new session's uid before
its child starts.

A uid goes back to the pool only after every process of it has been killed (and only then is its
directory taken back): a helper started as that uid sends ``kill(-1, SIGKILL)``, which reaches
exactly the processes of that uid in the gateway's PID namespace (a daemonised tool that left
the child's process group included) and nothing else. Allocation walks the range round-robin, so
a released uid is the last to be handed out again. A directory that is kept on disk (an unsaved
home) is given back to the gateway's uid before the uid is free, so a later holder of the same
uid cannot open it.

Where the gateway cannot switch uids, ``CXG_CHILD_ISOLATION=auto`` (the default) says so once
at start and children run as the gateway's own uid, as before; ``required`` refuses to start.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import enum
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

log = structlog.get_logger(__name__)

# Linux capability numbers (linux/capability.h) the isolated mode needs, and why:
#   CHOWN         hand restored files, config.toml and the model-token file to the child's uid
#   DAC_OVERRIDE  write its token file, delete its home, take a kept home back
#   KILL          SIGTERM/SIGKILL the child, which runs under another uid
#   SETGID        start the child with its own gid and no supplementary groups
#   SETUID        start the child (and the reaping helper) under the session's uid
REQUIRED_CAPABILITIES: Mapping[str, int] = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "KILL": 5,
    "SETGID": 6,
    "SETUID": 7,
}
_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
_PR_SET_NO_NEW_PRIVS = 38
_REAP_TIMEOUT_SECONDS = 10.0
# The helper: the shell's own ``kill`` builtin, run as the uid being reaped, signals every process
# of that uid except itself (kill(2) with pid -1); finding none is fine. /bin/sh is reachable by
# any uid, unlike an interpreter that may live under a private directory.
REAP_ARGV = ("/bin/sh", "-c", "kill -s KILL -- -1 2>/dev/null; exit 0")


class IsolationError(Exception):
    """Child isolation cannot be provided as configured; the message says what to fix."""


class IsolationMode(enum.Enum):
    """``CXG_CHILD_ISOLATION``."""

    AUTO = "auto"
    REQUIRED = "required"
    OFF = "off"


def kill_every_process_of(uid: int, *, timeout: float = _REAP_TIMEOUT_SECONDS) -> bool:
    """SIGKILL every process of ``uid`` with the helper above, run as that uid; blocking.

    For a caller outside the event loop (the replica keeper, ``gateway/replicas/deadman.py``).
    Returns whether the helper ran and exited 0. The caller must have checked that ``uid`` is
    a child uid: as root or as the caller's own uid, ``kill(-1)`` reaches far more.
    """
    if uid in (0, os.getuid(), os.geteuid()):
        raise IsolationError(f"refusing to reap uid {uid}: not a child uid")
    try:
        result = subprocess.run(
            list(REAP_ARGV),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            env={},
            cwd="/",
            timeout=timeout,
            user=uid,
            group=uid,
            extra_groups=[],
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


@attrs.frozen
class UidRange:
    """An inclusive range of uids (each also used as the gid of the same number)."""

    first: int
    last: int

    def __contains__(self, uid: object) -> bool:
        return isinstance(uid, int) and self.first <= uid <= self.last

    @property
    def size(self) -> int:
        """How many uids the range holds."""
        return self.last - self.first + 1


@attrs.frozen
class ChildIdentity:
    """The uid and gid one session's child runs under."""

    uid: int
    gid: int

    def spawn_options(self) -> dict[str, Any]:
        """Keyword arguments for ``subprocess.Popen`` / ``trio.lowlevel.open_process``."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def effective_capabilities(status_text: str) -> int:
    """The ``CapEff`` bit mask from the text of ``/proc/self/status``; pure."""
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split(":", 1)[1].strip(), 16)
    return 0


def missing_capabilities(effective: int) -> list[str]:
    """Names from ``REQUIRED_CAPABILITIES`` that the mask ``effective`` lacks; pure."""
    return [name for name, bit in REQUIRED_CAPABILITIES.items() if not effective >> bit & 1]


def _own_capabilities() -> int:
    try:
        return effective_capabilities(Path("/proc/self/status").read_text())
    except OSError:
        return 0


def untraversable_ancestor(path: Path) -> Path | None:
    """The first existing directory from ``/`` down to ``path`` that others cannot pass through."""
    current = Path("/")
    for part in path.resolve().parts[1:]:
        current = current / part
        try:
            mode = current.stat().st_mode
        except FileNotFoundError:
            return None
        if not mode & 0o001:
            return current
    return None


class ChildIsolation:
    """Which uid each session's child gets, and who owns its files; see the module docstring.

    ``enabled`` False means children run as the gateway's uid (every method is then a no-op
    apart from ``allocate`` returning ``None``).
    """

    def __init__(self, enabled: bool, uid_range: UidRange) -> None:
        self.enabled = enabled
        self.uid_range = uid_range
        self._live: set[int] = set()
        self._next = uid_range.first
        self._gateway_uid = os.geteuid()
        self._gateway_gid = os.getegid()

    @classmethod
    def from_settings(cls, mode: IsolationMode, uid_range: UidRange) -> ChildIsolation:
        """Decide at start whether children can be isolated; log the outcome once."""
        if mode is IsolationMode.OFF:
            log.warning(
                "isolation.off",
                detail="CXG_CHILD_ISOLATION=off: every child runs as the gateway's own uid",
                uid=os.geteuid(),
            )
            return cls(False, uid_range)
        missing = missing_capabilities(_own_capabilities())
        if missing:
            detail = (
                f"cannot run children under their own uids: the gateway lacks the capabilities "
                f"{', '.join(missing)} (run it as root, or grant them)"
            )
            if mode is IsolationMode.REQUIRED:
                raise IsolationError(f"CXG_CHILD_ISOLATION=required, but {detail}")
            log.warning("isolation.unavailable", detail=detail, uid=os.geteuid())
            return cls(False, uid_range)
        if os.geteuid() in uid_range or os.getegid() in uid_range:
            raise IsolationError(
                f"CXG_CHILD_UID_RANGE {uid_range.first}-{uid_range.last} contains the gateway's "
                "own uid or gid; choose a range of unused ids"
            )
        problem = _namespace_problem(uid_range)
        if problem is None:
            try:
                # The gateway needs no supplementary group, and a reader running with a child's
                # filesystem ids (reading_as) must not keep root's groups either.
                os.setgroups([])
            except PermissionError:
                problem = "supplementary groups cannot be dropped here (setgroups is denied)"
        if problem is not None:
            # Capabilities inside a user namespace: they do not reach ids outside its map.
            detail = f"cannot run children under their own uids: {problem}"
            if mode is IsolationMode.REQUIRED:
                raise IsolationError(f"CXG_CHILD_ISOLATION=required, but {detail}")
            log.warning("isolation.unavailable", detail=detail, uid=os.geteuid())
            return cls(False, uid_range)
        log.info("isolation.on", uid_range=f"{uid_range.first}-{uid_range.last}")
        return cls(True, uid_range)

    # -- the directories every session shares ------------------------------------------------

    def prepare_roots(self, tmp_root: Path, store_dir: Path | None) -> None:
        """Make ``tmp_root`` passable but not listable by children; the store private."""
        tmp_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if store_dir is not None:
            store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(store_dir, 0o700)
        if not self.enabled:
            os.chmod(tmp_root, 0o700)
            return
        os.chmod(tmp_root, 0o711)
        blocked = untraversable_ancestor(tmp_root)
        if blocked is not None:
            raise IsolationError(
                f"CXG_TMP_ROOT {tmp_root} is unreachable for child uids: {blocked} is not "
                "searchable by others (mode o+x is needed on every directory above it)"
            )

    # -- per session ----------------------------------------------------------------------------

    def allocate(self) -> ChildIdentity | None:
        """A uid no live session holds (round-robin); ``None`` when isolation is off."""
        if not self.enabled:
            return None
        for _ in range(self.uid_range.size):
            uid = self._next
            self._next = uid + 1 if uid < self.uid_range.last else self.uid_range.first
            if uid not in self._live:
                self._live.add(uid)
                return ChildIdentity(uid=uid, gid=uid)
        raise IsolationError(
            f"every uid of CXG_CHILD_UID_RANGE ({self.uid_range.size}) is in use; "
            "widen the range or lower CXG_MAX_SESSIONS"
        )

    def hand_over(self, identity: ChildIdentity | None, root: Path, private: list[Path]) -> None:
        """Give the session's private directories (and all they hold) to ``identity``.

        ``root`` stays the gateway's, passable only by the session's group; everything under
        each of ``private`` becomes the child's. Links are re-owned, never followed.
        """
        if identity is None:
            return
        os.chown(root, self._gateway_uid, identity.gid)
        os.chmod(root, 0o710)
        for directory in private:
            for path in _walk(directory):
                os.chown(path, identity.uid, identity.gid, follow_symlinks=False)

    def take_back(self, root: Path, *, whole: bool = True) -> None:
        """Give a session directory back to the gateway (root ``0700``).

        Called before the uid is released, so a later holder of the same uid or gid can
        neither pass through the session root nor open what is under it. ``whole`` also
        re-owns everything under it (a home kept on disk, which a later session may adopt);
        without it only the root is closed (enough for a home about to be deleted).
        """
        if not self.enabled or not root.exists():
            return
        for path in _walk(root) if whole else iter((root,)):
            os.chown(path, self._gateway_uid, self._gateway_gid, follow_symlinks=False)
        os.chmod(root, 0o700)

    def reading_as(self, identity: ChildIdentity | None, scratch: Path) -> Any:
        """A context manager for reading a live child's files (checkpoints) as the child would.

        See :func:`filesystem_identity`; ``scratch`` (the snapshot's own directory, created by
        the gateway) is handed to the child's uid first so that database copies can be made in
        it. Without isolation, a no-op.
        """
        if identity is None:
            return contextlib.nullcontext()
        os.chown(scratch, identity.uid, identity.gid)
        return filesystem_identity(identity.uid, identity.gid)

    async def release(
        self, identity: ChildIdentity | None, root: Path, *, whole: bool = True
    ) -> None:
        """Kill every process of ``identity``'s uid, take ``root`` back, free the uid.

        The reap comes first, so nothing of the uid can rearrange the tree while it is taken
        back (see :meth:`take_back` for ``whole``). If the reap cannot be confirmed, the uid
        stays out of the pool for the daemon's life (logged): handing it out again could give
        a new session a live process of an old one.
        """
        if identity is None:
            return
        if (
            identity.uid == 0
            or identity.uid == self._gateway_uid
            or identity.uid not in self.uid_range
        ):
            # kill(-1) as root or as the gateway would signal processes that are not the
            # session's; never let a mistake elsewhere turn the reap into that.
            raise IsolationError(f"refusing to reap uid {identity.uid}: not a child uid")
        try:
            with trio.fail_after(_REAP_TIMEOUT_SECONDS):
                result = await trio.run_process(
                    list(REAP_ARGV),
                    stdin=subprocess.DEVNULL,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env={},
                    cwd="/",
                    **identity.spawn_options(),
                )
        except (OSError, trio.TooSlowError) as exc:
            log.error("isolation.reap_failed", uid=identity.uid, error=str(exc))
            return
        if result.returncode != 0:
            log.error(
                "isolation.reap_failed",
                uid=identity.uid,
                status=result.returncode,
                stderr=result.stderr.decode("utf-8", "replace")[-500:],
            )
            return
        await trio.to_thread.run_sync(lambda: self.take_back(root, whole=whole))
        self._live.discard(identity.uid)

    @property
    def live_uids(self) -> frozenset[int]:
        """Uids currently held by sessions (for tests and the admin view)."""
        return frozenset(self._live)


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _LIBC


@contextlib.contextmanager
def filesystem_identity(uid: int, gid: int) -> Iterator[None]:
    """Run the block's file access, in this thread only, with ``uid``/``gid`` as fs ids.

    The gateway reads a running child's home for checkpoints while the child may rearrange it
    (swap a file or a directory for a link to another workspace's home or a secret file between
    the walk and the read). Reading with the child's filesystem ids makes every such access get
    exactly what the child itself could read. ``setfsuid`` is per thread, and moving the fs uid
    away from 0 drops this thread's DAC capabilities until it is moved back (capabilities(7)).
    """
    libc = _libc()
    old_uid = libc.setfsuid(-1)
    old_gid = libc.setfsgid(-1)
    try:
        libc.setfsgid(gid)
        libc.setfsuid(uid)
        if libc.setfsuid(-1) != uid or libc.setfsgid(-1) != gid:
            raise IsolationError(f"could not read as uid {uid}: setfsuid/setfsgid refused")
        yield
    finally:
        libc.setfsuid(old_uid)
        libc.setfsgid(old_gid)


def _walk(directory: Path) -> Iterator[Path]:
    """``directory`` and everything under it, without following links."""
    yield directory
    for parent, dirs, files in os.walk(directory, followlinks=False):
        for name in (*dirs, *files):
            yield Path(parent) / name


def harden_process() -> None:
    """Make the gateway non-dumpable and stop its children from gaining privileges.

    Non-dumpable: ``/proc/<gateway>/environ``, ``mem``, ``fd``, ``maps`` … become root-owned
    and closed to every other process without CAP_SYS_PTRACE, even one of the gateway's own
    uid (the non-isolated mode), and no core dump holds the secrets. No-new-privileges is
    inherited by every child and can never be lifted: a set-uid file a child leaves behind
    (in ``/tmp``, say) cannot lift another child to its uid.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for option in (_PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS):
        value = 0 if option == _PR_SET_DUMPABLE else 1
        if libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"prctl({option}) failed: {os.strerror(error)}")
    log.info("daemon.hardened", dumpable=libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0))


def mapped_ranges(uid_map_text: str) -> list[tuple[int, int]]:
    """The inclusive id ranges a ``/proc/<pid>/uid_map`` text maps (inside ids); pure."""
    ranges = []
    for line in uid_map_text.splitlines():
        fields = line.split()
        if len(fields) == 3 and all(field.isdigit() for field in fields):
            inside, _outside, count = (int(field) for field in fields)
            ranges.append((inside, inside + count - 1))
    return ranges


def _namespace_problem(uid_range: UidRange) -> str | None:
    """Why ``uid_range`` cannot be used in this user namespace, or ``None`` if it can."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as handle:
            ranges = mapped_ranges(handle.read())
    except OSError:
        return None  # no user namespaces on this kernel: every id exists
    if any(first <= uid_range.first and uid_range.last <= last for first, last in ranges):
        return None
    return (
        f"CXG_CHILD_UID_RANGE {uid_range.first}-{uid_range.last} is not mapped in this user "
        "namespace (/proc/self/uid_map)"
    )
