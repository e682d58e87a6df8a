"""Starting a session's child so that it dies with the daemon and keeps its tree together.

``open_child_process`` takes the keyword arguments of ``trio.lowlevel.open_process`` (they go to
``subprocess.Popen``) and differs from it in two ways that matter here:

* **The fork happens in the calling (Trio) thread.** ``PR_SET_PDEATHSIG`` fires when the
  *thread* that forked the child exits, not the process. ``trio.lowlevel.open_process`` forks in
  a worker thread of Trio's thread cache, and those threads exit after a few idle seconds: the
  child would be killed by its own parent-death signal while the daemon is alive. The thread
  that runs the event loop lives exactly as long as the daemon. Forking with a ``preexec_fn``
  blocks the loop for the fork itself (measured: ~7 ms at 150 MB RSS, ~30 ms at 600 MB), once
  per session start.
* **Exit and reaping are separate** (``wait_exited`` / ``reap``). Until the leader is reaped its
  pid, which is also its process group and session id, cannot be reused, so signalling the
  group after the leader died can never hit an unrelated process.

The ``preexec_fn`` (run in the child between fork and exec, after any uid/gid switch that
``Popen`` does) sets ``PR_SET_PDEATHSIG`` to SIGKILL and ``PR_SET_CHILD_SUBREAPER``, and kills
the child at once if the daemon already died before the prctl (``getppid`` is no longer the
daemon). Both settings survive ``execve`` of a binary that is not set-uid. The subreaper
setting makes every orphaned descendant of the child (a tool that backgrounds a process and
exits, a double fork, a ``setsid``) reparent to the child instead of to init, so the whole tree
of a session stays below its leader for as long as the leader lives (``process_tree``).
It must stay minimal: Python code after ``fork`` in a threaded process must not take locks or
import, so it only calls a ``prctl`` resolved before the fork.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

import trio

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def child_preexec(parent_pid: int) -> Callable[[], None]:
    """The ``preexec_fn`` for a session child of the process ``parent_pid`` (see the docstring)."""
    kill, sigkill, getppid, getpid = os.kill, int(signal.SIGKILL), os.getppid, os.getpid

    def preexec() -> None:
        if _prctl(PR_SET_PDEATHSIG, sigkill, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
        # The daemon may have died between fork and the prctl: the signal would never come.
        if getppid() != parent_pid:
            kill(getpid(), sigkill)

    return preexec


class ChildProcess:
    """A child started by ``open_child_process``: its pid, its output pipes, exit and reaping."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdout: trio.lowlevel.FdStream | None,
        stderr: trio.lowlevel.FdStream | None,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdout = stdout
        self.stderr = stderr
        self._pidfd: int | None = os.pidfd_open(popen.pid)
        self._exited = False

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal), else None."""
        return self._popen.returncode

    @property
    def exited(self) -> bool:
        """Whether the child has exited (it may not be reaped yet)."""
        if not self._exited and self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            self._exited = bool(poller.poll(0))
        return self._exited or self._pidfd is None

    async def wait_exited(self) -> None:
        """Return once the child has exited, without reaping it (one waiter at a time)."""
        if self._pidfd is not None and not self._exited:
            await trio.lowlevel.wait_readable(self._pidfd)
            self._exited = True

    def reap(self) -> int:
        """Collect the exit status of an exited child; its pid may be reused afterwards."""
        status = self._popen.wait()
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        return status

    async def wait(self) -> int:
        """Wait for the child to exit and reap it."""
        await self.wait_exited()
        return self.reap()

    def send_signal(self, sig: int) -> None:
        """Signal the child itself (never a reused pid: the signal goes through its pidfd)."""
        if self._pidfd is None:
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        """SIGKILL the child itself; a child that already exited is left as it is."""
        with contextlib.suppress(ProcessLookupError):
            self.send_signal(signal.SIGKILL)


def start_child_process(
    argv: Sequence[str],
    *,
    stdin: int | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    **options: Any,
) -> ChildProcess:
    """Start ``argv`` in this thread with the session preexec (see the module docstring).

    ``stdout``/``stderr`` may be ``subprocess.PIPE`` (a Trio stream on our side) or anything
    ``Popen`` takes; the other keyword arguments go to ``subprocess.Popen`` as they are.
    Synchronous on purpose: the fork must happen in the event loop's own thread.
    """
    pipes: dict[str, tuple[int, int]] = {}
    try:
        for name, wanted in (("stdout", stdout), ("stderr", stderr)):
            if wanted == subprocess.PIPE:
                pipes[name] = os.pipe()
        popen = subprocess.Popen(
            list(argv),
            stdin=stdin,
            stdout=pipes["stdout"][1] if "stdout" in pipes else stdout,
            stderr=pipes["stderr"][1] if "stderr" in pipes else stderr,
            preexec_fn=child_preexec(os.getpid()),
            **options,
        )
    except BaseException:
        for read_end, _ in pipes.values():
            os.close(read_end)
        raise
    finally:
        # The child holds the only write ends now, so its exit gives EOF on ours.
        for _, write_end in pipes.values():
            os.close(write_end)
    streams = {name: trio.lowlevel.FdStream(read_end) for name, (read_end, _) in pipes.items()}
    return ChildProcess(popen, streams.get("stdout"), streams.get("stderr"))
