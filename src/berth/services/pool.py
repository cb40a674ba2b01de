"""A bounded thread pool for libvips work, with admission control on the event loop.

libvips releases the GIL while it computes, so threads give real parallelism;
the pool has one thread per core and one more (config.default_workers), for
the moments a worker waits on libvips' own thread or the GIL. A request takes
its place *before* its body is read, so at most ``workers + queue`` uploads are
ever held in memory; beyond that the answer is an immediate 503 with
Retry-After, instead of queueing without bound and timing out everybody.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from berth.services.errors import Overloaded

T = TypeVar("T")


class PoolState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


class Admission:
    """One request's place in the pool, held from admission until its job has ended."""

    def __init__(self, pool: WorkPool) -> None:
        self._pool = pool
        self._job: asyncio.Future[Any] | None = None
        self._released = False

    def __repr__(self) -> str:
        state = "released" if self._released else "running" if self._job else "admitted"
        return f"<Admission {state}>"

    async def __aenter__(self) -> Admission:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A started job cannot be cancelled: if the client went away while it
        # runs, the place is given back only when the thread is really free.
        if self._job is None or self._job.done():
            self._release()

    async def run(self, fn: Callable[[], T]) -> T:
        if self._job is not None:
            raise RuntimeError("an admission runs one job")
        job = asyncio.get_running_loop().run_in_executor(self._pool.executor, fn)
        self._job = job
        job.add_done_callback(self._finished)
        return await asyncio.shield(job)

    def _finished(self, job: asyncio.Future[Any]) -> None:
        if not job.cancelled():
            job.exception()  # retrieved here so an abandoned job does not log a warning
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.admitted -= 1


class WorkPool:
    def __init__(self, workers: int, queue: int) -> None:
        self.workers = workers
        self.queue = queue
        self.state = PoolState.OPEN
        # Only touched from the event loop thread, so a plain int is enough.
        self.admitted = 0
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vips")

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

    def admit(self) -> Admission:
        if not self.can_admit():
            raise Overloaded(
                "service is closing"
                if self.state is PoolState.CLOSED
                else f"{self.admitted} requests in progress, queue is full"
            )
        self.admitted += 1
        return Admission(self)

    async def run(self, fn: Callable[[], T]) -> T:
        """Admit and run in one step (for work whose input is already at hand)."""
        async with self.admit() as admission:
            return await admission.run(fn)

    def close(self) -> None:
        """Refuse new work and let running jobs finish (their requests are still awaited)."""
        self.state = PoolState.CLOSED
        self.executor.shutdown(wait=False, cancel_futures=False)
