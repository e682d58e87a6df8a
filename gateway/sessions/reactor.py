"""One task that serves the readiness of every tunnel's sockets from one persistent epoll set.

A relay pump waiting for its socket through Trio (``wait_readable``) pays, for every message,
an ``epoll_ctl`` to re-arm the descriptor, a pass of the scheduler and a switch into its task
and back: about 12 µs of the daemon's CPU per wait on the 2-core machine the benchmarks run on,
more than the relay's own work on a small message. nginx pays none of it: its sockets stay
registered in one epoll set and one turn of its loop serves every ready socket.

``Reactor`` does the same inside Trio. Its one task waits (through Trio, so every pass is a
scheduling point) for its own epoll descriptor, then calls, in that one pass, the *ready
handler* of every socket that is ready. A handler is the relay's synchronous fast path: a whole
message read, checked and written, with no wait. A socket stays registered while its handler
keeps up, so the fast path costs no ``epoll_ctl`` and no task switch. When the handler cannot
finish without waiting (a frame cut by the read, a write the kernel did not take, a close
frame, anything rare) it returns ``False``: the socket leaves the set and the pump that parked on
it wakes up to do the slow work with its ordinary awaits, exactly as it would without the
reactor.

Ownership: the daemon starts ``Reactor.run`` in its root nursery before anything that relays
and ends it with ``Reactor.close`` once the drain is over (or by cancelling that nursery). A
pump's wait is cancellable like any Trio wait (the socket leaves the set), so a relay's cancel
scope tears its pumps down as before. Where there is no epoll (not Linux), or before the loop
runs and after it ended, a wait falls back to Trio's own ``wait_readable`` and the pump does
all the work itself.
"""

from __future__ import annotations

import contextlib
import select
from collections.abc import Callable

import outcome
import structlog
import trio
from trio.lowlevel import (
    Abort,
    Task,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

log = structlog.get_logger(__name__)

# Called when its socket is ready; ``True``: handled, keep waiting; ``False``: wake the waiter.
ReadyHandler = Callable[[], bool]

# Level-triggered: a socket with unread data (or at end of stream, or failed) is reported on
# every pass until its handler or its waiter reads it. Errors and hang-ups are always reported.
_READY = getattr(select, "EPOLLIN", 0)
# Events taken per pass: a bound on the work one pass does before other tasks run again.
MAX_EVENTS_PER_PASS = 256


class Reactor:
    """Serves the readiness of parked sockets from one epoll set, in one Trio task."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._waiters: dict[int, tuple[Task, ReadyHandler]] = {}
        self._scope = trio.CancelScope()
        self.passes = 0  # loop passes with at least one ready socket (for tests and profiles)
        self.handled = 0  # readiness events a handler finished without waking its waiter

    @property
    def running(self) -> bool:
        """Whether the loop is serving waits (otherwise they fall back to Trio's)."""
        return self._epoll is not None

    def close(self) -> None:
        """End the loop (waits from then on are Trio's own)."""
        self._scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The loop: until closed or cancelled, serve every ready socket's handler once per pass."""
        with self._scope:
            if not hasattr(select, "epoll"):
                task_status.started()
                await trio.sleep_forever()
            await self._serve(task_status)

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        epoll = select.epoll()
        self._epoll = epoll
        try:
            task_status.started()
            poll, fileno, waiters = epoll.poll, epoll.fileno(), self._waiters
            while True:
                await trio.lowlevel.wait_readable(fileno)
                events = poll(0, MAX_EVENTS_PER_PASS)
                if events:
                    self.passes += 1
                for fd, _ in events:
                    waiter = waiters.get(fd)
                    if waiter is None:
                        continue  # its wait ended earlier in this pass
                    task, handler = waiter
                    failure: Exception | None = None
                    try:
                        if handler():
                            self.handled += 1
                            continue  # it waits on (or, cancelled by its handler, was woken)
                    except Exception as exc:  # the handler's failure is its relay's
                        failure = exc
                    if waiters.get(fd) is not waiter:
                        continue  # the handler cancelled its own waiter (Trio woke it)
                    self._forget(fd)
                    reschedule(
                        task, outcome.Value(None) if failure is None else outcome.Error(failure)
                    )
        finally:
            self._epoll = None
            # Whoever still waits goes back to Trio's own waits.
            for fd, (task, _) in list(self._waiters.items()):
                self._forget(fd)
                reschedule(task, outcome.Value(None))
            epoll.close()

    async def wait_readable(self, fd: int, on_ready: ReadyHandler) -> None:
        """Wait until ``fd`` is readable and ``on_ready`` (if it ran) could not handle it.

        ``on_ready`` runs in the reactor's task each time ``fd`` is ready while this waits; it
        must not block and must leave the socket to the waiter when it returns ``False`` or
        raises (what it raises is raised here). Cancellable; the descriptor leaves the set.
        """
        epoll = self._epoll
        if epoll is None or fd in self._waiters:
            await trio.lowlevel.wait_readable(fd)
            return
        task = current_task()
        epoll.register(fd, _READY)
        self._waiters[fd] = (task, on_ready)

        def abort(_: object) -> Abort:
            self._forget(fd)
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    def _forget(self, fd: int) -> None:
        if self._waiters.pop(fd, None) is not None and self._epoll is not None:
            # Closed under us, the kernel has removed it already.
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
