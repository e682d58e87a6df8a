"""The daemon-wide budget for client bytes held in memory (``CXG_WS_INFLIGHT_BUDGET``).

A client→child message must be complete before the access policy can check it, so the tunnel
holds it until it has been checked and written to the child. Every byte held beyond a
connection's one read buffer is taken from this budget first; when the budget is spent, a
connection stops reading its client (TCP backpressure reaches the sender) until bytes come
back. Waiters are served first come, first served, so one large message is not starved by a
stream of small ones.
"""

from __future__ import annotations

from collections import deque

import trio

from gateway import metrics


class InflightBudget:
    """A counting semaphore over bytes, FIFO."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._waiters: deque[tuple[int, trio.Event]] = deque()

    async def acquire(self, amount: int) -> None:
        """Take ``amount`` bytes, waiting (cancellably) until they are free."""
        if amount > self.total:
            raise ValueError(f"{amount} bytes exceed the whole in-flight budget ({self.total})")
        if not self._waiters and self.used + amount <= self.total:
            self.used += amount
            metrics.INFLIGHT_BYTES.set(self.used)
            return
        ticket = (amount, trio.Event())
        self._waiters.append(ticket)
        try:
            await ticket[1].wait()
        except BaseException:
            if ticket[1].is_set():
                # Granted just as we were cancelled: give it back.
                self.release(amount)
            else:
                self._waiters.remove(ticket)
                self._grant()
            raise

    def release(self, amount: int) -> None:
        """Give ``amount`` bytes back and wake whoever they are enough for."""
        self.used -= amount
        self._grant()
        metrics.INFLIGHT_BYTES.set(self.used)

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.total:
            amount, event = self._waiters.popleft()
            self.used += amount
            event.set()
        metrics.INFLIGHT_BYTES.set(self.used)
