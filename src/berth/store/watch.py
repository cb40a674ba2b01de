"""Wakeups for blocking queries: a write wakes only the watchers of what it changed.

Watchers of the same thing share one future, so a write that concerns a
thousand watchers of one prefix resolves one future; each watcher then re-runs
its query. A KV watcher registers its key or prefix; a write to key K wakes
every registered prefix of K (a single-key watcher is a prefix watcher of its
key, which at worst wakes it for a longer key, and it simply waits again).
Other reads watch named topics ("svc:web", "catalog", ...), the same names as
the state's indexes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from berth.store.state import Changes


class WatchHub:
    def __init__(self) -> None:
        self._prefixes: dict[str, asyncio.Future[None]] = {}
        self._topics: dict[str, asyncio.Future[None]] = {}
        self._lengths: dict[int, int] = {}  # watched prefix length -> how many prefixes
        # Waiters per pending future, so a future nobody waits on any more (its
        # watchers timed out or went away) is dropped instead of kept forever.
        self._waiters: dict[asyncio.Future[None], int] = {}
        self.wakeups = 0

    def __repr__(self) -> str:
        return (
            f"<WatchHub prefixes={len(self._prefixes)} topics={len(self._topics)}"
            f" waiters={sum(self._waiters.values())} wakeups={self.wakeups}>"
        )

    def prefix(self, prefix: str) -> asyncio.Future[None]:
        """The future resolved by the next write under ``prefix``; pair with release()."""
        fut = self._prefixes.get(prefix)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._prefixes[prefix] = fut
            self._lengths[len(prefix)] = self._lengths.get(len(prefix), 0) + 1
        self._waiters[fut] = self._waiters.get(fut, 0) + 1
        return fut

    def topic(self, name: str) -> asyncio.Future[None]:
        """The future resolved by the next change of ``name``; pair with release()."""
        fut = self._topics.get(name)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._topics[name] = fut
        self._waiters[fut] = self._waiters.get(fut, 0) + 1
        return fut

    def release(self, fut: asyncio.Future[None], prefix: str | None, topic: str | None) -> None:
        """One waiter of ``fut`` stopped waiting; forget the future once nobody does."""
        left = self._waiters.get(fut, 0) - 1
        if left > 0:
            self._waiters[fut] = left
            return
        self._waiters.pop(fut, None)
        if fut.done():
            return
        if prefix is not None and self._prefixes.get(prefix) is fut:
            del self._prefixes[prefix]
            self._drop_length(len(prefix))
        elif topic is not None and self._topics.get(topic) is fut:
            del self._topics[topic]
        fut.cancel()

    def _drop_length(self, length: int) -> None:
        remaining = self._lengths[length] - 1
        if remaining:
            self._lengths[length] = remaining
        else:
            del self._lengths[length]

    def notify(self, changes: Iterable[Changes]) -> None:
        for change in changes:
            for key in change.kv:
                self._wake_prefixes_of(key)
            for name in change.indexes:
                fut = self._topics.pop(name, None)
                if fut is not None:
                    self._wake(fut)

    def notify_all(self) -> None:
        """Wake everyone (shutdown: blocked readers answer with the current state)."""
        for fut in [*self._prefixes.values(), *self._topics.values()]:
            self._wake(fut)
        self._prefixes.clear()
        self._topics.clear()
        self._lengths.clear()
        self._waiters.clear()

    def _wake_prefixes_of(self, key: str) -> None:
        if not self._prefixes:
            return
        # Only lengths somebody watches are sliced: usually a handful.
        for length in list(self._lengths):
            if length > len(key):
                continue
            fut = self._prefixes.pop(key[:length], None)
            if fut is None:
                continue
            self._drop_length(length)
            self._wake(fut)

    def _wake(self, fut: asyncio.Future[None]) -> None:
        self._waiters.pop(fut, None)
        if not fut.done():
            self.wakeups += 1
            fut.set_result(None)
