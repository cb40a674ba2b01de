"""A bounded thread pool for libvips work, with admission control on the event loop.

libvips releases the GIL while it computes, so threads give real parallelism;
the pool is sized to the cores because more threads only fight over them. Work
beyond ``workers + queue`` is refused up front (the caller answers 503 with
Retry-After) instead of queueing without bound and timing out everybody.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from berth.services.errors import Overloaded

T = TypeVar("T")


class PoolState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class WorkPool:
    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.queue = queue
        self.state = PoolState.OPEN
        # Only touched from the event loop thread, so a plain int is enough.
        self.admitted = 0
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vips")

    def __repr__(self) -> str:
        return (
            f"<WorkPool {self.state.value} running={self.running} queued={self.queued} "
            f"workers={self.workers} queue={self.queue}>"
        )

    @property
    def running(self) -> int:
        return min(self.admitted, self.workers)

    @property
    def queued(self) -> int:
        return max(0, self.admitted - self.workers)

    def can_admit(self) -> bool:
        return self.state is PoolState.OPEN and self.admitted < self.workers + self.queue

    async def run(self, fn: Callable[[], T]) -> T:
        if not self.can_admit():
            raise Overloaded(
                "service is closing"
                if self.state is PoolState.CLOSED
                else f"{self.admitted} requests in progress, queue is full"
            )
        self.admitted += 1
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn)
        # A started job cannot be cancelled, so it stays counted until it really
        # ends even if the client goes away; shield keeps it running meanwhile.
        future.add_done_callback(self._finished)
        return await asyncio.shield(future)

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self.admitted -= 1
        if not future.cancelled():
            future.exception()  # retrieved here so an abandoned job does not log a warning

    def close(self) -> None:
        """Refuse new work and let running jobs finish (their requests are still awaited)."""
        self.state = PoolState.CLOSED
        self._executor.shutdown(wait=False, cancel_futures=False)
