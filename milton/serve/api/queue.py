"""The bounded queue in front of the single model context: one generation at a time, at most
``serve.max_queue`` requests waiting, the rest answered 429 at once."""

from __future__ import annotations

import asyncio


class QueueFull(Exception):
    pass


class RequestQueue:
    """One generation at a time on the model context, at most ``max_queue`` requests waiting.

    Lives on the event loop: admit, acquire and release are called from it (worker threads hand
    their release back with ``loop.call_soon_threadsafe``).
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.admitted = 0  # generating + waiting (memory lookup included)
        self.active = 0
        self.rejected = 0
        self._lock = asyncio.Lock()

    @property
    def waiting(self) -> int:
        return self.admitted - self.active

    def admit(self) -> Ticket:
        if self.admitted >= self.max_queue + 1:
            self.rejected += 1
            raise QueueFull()
        self.admitted += 1
        return Ticket(self)


class Ticket:
    """One admitted request: its place in the queue, then the model slot."""

    def __init__(self, queue: RequestQueue) -> None:
        self.queue = queue
        self.holding = False
        self.done = False

    async def acquire(self) -> None:
        await self.queue._lock.acquire()
        self.holding = True
        self.queue.active += 1

    def release(self) -> None:
        """Idempotent: leave the model slot (if held) and the queue."""
        if self.holding:
            self.holding = False
            self.queue.active -= 1
            self.queue._lock.release()
        if not self.done:
            self.done = True
            self.queue.admitted -= 1
