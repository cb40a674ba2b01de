"""Session TTL timers: an unrenewed session is invalidated after TTL x multiplier.

Renewals only move a timer on the loop (as in Consul, they are not writes);
expiry is a write that destroys the session, releasing or deleting its keys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from berth.store.client import parse_duration
from berth.store.model import Session
from berth.store.state import State, Tx

log = logging.getLogger("berth.store.sessions")

Writer = Callable[[Callable[[Tx], Any]], Awaitable[Any]]


class SessionTimers:
    def __init__(self, state: State, write: Writer, multiplier: float) -> None:
        self.state = state
        self._write = write
        self._multiplier = multiplier
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.expired = 0

    def __repr__(self) -> str:
        return f"<SessionTimers armed={len(self._timers)} expired={self.expired}>"

    def start(self) -> None:
        # After a restart every TTL starts afresh, as after a Consul leader election.
        for session in list(self.state.sessions.values()):
            self.sync(session.id, session)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def sync(self, session_id: str, session: Session | None) -> None:
        if session is None:
            timer = self._timers.pop(session_id, None)
            if timer is not None:
                timer.cancel()
        elif session.ttl and session_id not in self._timers:
            self.renew(session_id)

    def renew(self, session_id: str) -> None:
        session = self.state.sessions.get(session_id)
        if session is None or not session.ttl:
            return
        old = self._timers.pop(session_id, None)
        if old is not None:
            old.cancel()
        delay = parse_duration(session.ttl) * self._multiplier
        loop = asyncio.get_running_loop()
        self._timers[session_id] = loop.call_later(delay, self._expire, session_id)

    def _expire(self, session_id: str) -> None:
        self._timers.pop(session_id, None)
        self.expired += 1
        task = asyncio.ensure_future(self._destroy(session_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _destroy(self, session_id: str) -> None:
        now = asyncio.get_running_loop().time()

        def invalidate(tx: Tx) -> bool:
            # A renewal answered since the timer fired re-armed it: the client
            # was told its session lives, so it does.
            if session_id in self._timers:
                return False
            log.info("session %s expired; invalidating it", session_id)
            return tx.session_destroy(session_id, now)

        try:
            await self._write(invalidate)
        except Exception:
            log.exception("could not invalidate session %s", session_id)
