"""Signal handling shared by every long-running ``berth`` command."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a command's main coroutine on uvloop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def run_until_signal(
    on_signal: Callable[[], None], wait_stopped: Callable[[], Awaitable[None]]
) -> None:
    """Wait for SIGINT/SIGTERM, ask the service to stop, then wait until it has.

    A second signal does not kill the drain: stopping in order matters more
    than stopping fast, and SIGKILL remains for the impatient.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(wait_stopped())
    stopper = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if stopper in done:
        on_signal()
    else:
        stopper.cancel()
    await waiter
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
