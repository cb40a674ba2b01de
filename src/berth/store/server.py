"""The embedded store as a control-plane component: state, persistence, watches, API."""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import orjson
from starlette.types import Receive, Scope, Send

from berth.store.api import agent, kv, session, txn
from berth.store.api.http import TEXT, Request, parse_request, respond, wait_param
from berth.store.checks import CheckRunner
from berth.store.config import StoreConfig
from berth.store.errors import BadRequest, InvalidState, NotFound, RequestError
from berth.store.model import Check, Session
from berth.store.persist import Persistence, PersistenceFailed
from berth.store.sessions import SessionTimers
from berth.store.state import Changes, State, Tx
from berth.store.watch import WatchHub

log = logging.getLogger("berth.store")

R = TypeVar("R")
DB_FILE = "store.db"


class ClientGone(Exception):
    """The client of a blocking query disconnected: there is nobody to answer."""


async def _disconnected(receive: Receive) -> None:
    # A GET's (empty) body comes first; the next message only arrives on disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass


class Lifecycle(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    DRAINING = "draining"  # the server is stopping: still serving, but never blocking
    CLOSING = "closing"
    CLOSED = "closed"


class StoreServer:
    prefixes: tuple[str, ...] = ("/v1/",)

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.state = State(config.node_name)
        self.hub = WatchHub()
        self.persistence = Persistence(
            config.data_dir / DB_FILE, config.sqlite_synchronous, on_commit=self._committed
        )
        self.checks = CheckRunner(
            self.state, self.write, config.limit_check_concurrency, config.reap_interval_s
        )
        self.sessions = SessionTimers(self.state, self.write, config.session_ttl_multiplier)
        self.lifecycle = Lifecycle.NEW
        self.node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, config.node_name + ".berth"))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tombstone_marks: list[tuple[float, int]] = []
        self._housekeeper: asyncio.Task[None] | None = None
        self.dumps: Callable[[Any], bytes] = orjson.dumps

    def __repr__(self) -> str:
        return (
            f"<StoreServer {self.lifecycle.value} index={self.state.index}"
            f" keys={len(self.state.kv)} services={len(self.state.services)}"
            f" sessions={len(self.state.sessions)} db={self.persistence.path}>"
        )

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        snap = await asyncio.to_thread(self.persistence.open)
        self.state.load(snap.index, snap.entries, snap.tombstones, snap.objects, snap.indexes)
        self.persistence.start(self._loop)
        self.checks.start()
        self.sessions.start()
        self._housekeeper = asyncio.create_task(self._reap_tombstones())
        self.lifecycle = Lifecycle.RUNNING
        log.info(
            "store loaded %d keys, %d services, %d sessions at index %d from %s",
            len(self.state.kv),
            len(self.state.services),
            len(self.state.sessions),
            self.state.index,
            self.persistence.path,
        )

    def drain(self) -> None:
        """The control plane is stopping: answer blocked readers now, block no more."""
        if self.lifecycle is Lifecycle.RUNNING:
            self.lifecycle = Lifecycle.DRAINING
            self.hub.notify_all()

    async def stop(self) -> None:
        if self.lifecycle not in (Lifecycle.RUNNING, Lifecycle.DRAINING):
            return
        self.lifecycle = Lifecycle.CLOSING
        # Blocked readers answer now with the current state rather than hanging
        # the shutdown for up to ten minutes.
        self.hub.notify_all()
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            await asyncio.gather(self._housekeeper, return_exceptions=True)
        await self.checks.stop()
        await self.sessions.stop()
        await self.persistence.close()
        self.lifecycle = Lifecycle.CLOSED

    # -- what the handlers use ----------------------------------------------------

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def write(self, fn: Callable[[Tx], R]) -> R:
        """Apply ``fn`` atomically; return once the change is committed to disk."""
        # Checked before applying: after a failed commit nothing more may reach
        # memory, or it would be visible yet lost on restart.
        self.persistence.raise_if_failed()
        if self.lifecycle is Lifecycle.CLOSED:
            # No writer thread is left to commit it: it would wait forever.
            raise PersistenceFailed("the store is closed")
        result, changes = self.state.write(fn)
        # Even a write that changed nothing may have answered from writes still
        # being committed: it waits for them too.
        fut = self.persistence.submit(changes) if changes else self.persistence.barrier()
        if fut is not None:
            await asyncio.shield(fut)
        return result

    async def block(
        self,
        req: Request,
        query: Callable[[], tuple[int, R]],
        prefix: str | None = None,
        topic: str | None = None,
    ) -> tuple[int, R]:
        """Run ``query``; with ``?index=N`` wait until its index passes N or the wait ends.

        The answer is returned only once every write it reflects is durable.
        """
        raw_index = req.param("index")
        try:
            min_index = int(raw_index) if raw_index else 0
        except ValueError:
            raise BadRequest("Invalid index") from None
        if min_index < 0:
            raise BadRequest("Invalid index")
        # Parsed on every read, blocking or not, as Consul does: a bad wait is a 400.
        cfg = self.config
        wait = wait_param(req, cfg.wait_default_s, cfg.wait_max_s)
        index, result = query()
        # An index beyond any this store has issued comes from another store's
        # history (a reset or a different server): answer at once so the client
        # sees the index go backwards and restarts its watch.
        blocking = 0 < min_index <= self.state.index and index <= min_index
        if blocking and self.lifecycle is Lifecycle.RUNNING:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait + random.uniform(0, wait / 16)
            # A blocked reader that hangs up stops waiting at once.
            gone = asyncio.ensure_future(_disconnected(req.receive))
            try:
                while self.lifecycle is Lifecycle.RUNNING:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    if prefix is not None:
                        fut = self.hub.prefix(prefix)
                    else:
                        fut = self.hub.topic(topic or "")
                    try:
                        await asyncio.wait(
                            (fut, gone), timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        self.hub.release(fut, prefix, topic)
                    if gone.done():
                        raise ClientGone()
                    index, result = query()
                    if index > min_index:
                        break
            except asyncio.CancelledError:
                # uvicorn cancels requests still open when its graceful shutdown
                # times out; a blocked reader then gets the current state, as on
                # a wait timeout, instead of a 500.
                task = asyncio.current_task()
                if task is None or task.uncancel() > 0:
                    raise
                index, result = query()
            finally:
                gone.cancel()
        # A commit may have failed while this reader waited: what it would
        # answer from memory is no longer what the disk holds.
        self.persistence.raise_if_failed()
        barrier = self.persistence.barrier()
        if barrier is not None:
            await asyncio.shield(barrier)
        return index, result

    def _committed(self, changes: list[Changes]) -> None:
        self.hub.notify(changes)
        if self.lifecycle in (Lifecycle.CLOSING, Lifecycle.CLOSED):
            # The runners are stopping or stopped: a timer armed now would fire
            # into a closed store. start() re-syncs them from the state.
            return
        for change in changes:
            for (kind, oid), obj in change.objects.items():
                if kind == "check":
                    assert obj is None or isinstance(obj, Check)
                    self.checks.sync(oid, obj)
                elif kind == "session":
                    assert obj is None or isinstance(obj, Session)
                    self.sessions.sync(oid, obj)

    async def _reap_tombstones(self) -> None:
        """Forget tombstones older than tombstone_ttl_s (prefix indexes may then go
        backwards, as in Consul; clients reset their watch on that)."""
        interval = min(60.0, self.config.tombstone_ttl_s / 4)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            self._tombstone_marks.append((now, self.state.index))
            horizon = now - self.config.tombstone_ttl_s
            cutoff = 0
            while self._tombstone_marks and self._tombstone_marks[0][0] <= horizon:
                cutoff = self._tombstone_marks.pop(0)[1]
            if cutoff:
                state = self.state
                old = [k for k, idx in state.tombstones.items() if idx <= cutoff]
                for key in old:
                    del state.tombstones[key]
                    state.tomb_keys.remove(key)
                self.persistence.reap(old)

    # -- ASGI -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # Memory is ahead of disk once a commit failed: serving it would show
            # data a restart loses, so every request gets the failure (as a
            # Consul server without a writable log answers none).
            self.persistence.raise_if_failed()
            req = parse_request(scope, receive)
            path = req.path
            dc = req.param("dc")
            if dc and dc != self.config.datacenter:
                raise InvalidState(f"No path to datacenter {dc!r}")
            if path.startswith("/v1/kv/"):
                await kv.handle(self, req, send)
            elif path == "/v1/txn":
                await txn.handle(self, req, send)
            elif path.startswith("/v1/agent/"):
                await agent.handle_agent(self, req, send)
            elif path.startswith("/v1/health/"):
                await agent.handle_health(self, req, send)
            elif path.startswith("/v1/catalog/"):
                await agent.handle_catalog(self, req, send)
            elif path.startswith("/v1/session/"):
                await session.handle(self, req, send)
            elif path.startswith("/v1/status/"):
                await agent.handle_status(self, req, send)
            elif path == "/v1/kv":
                raise BadRequest("Missing key name")
            else:
                raise NotFound(f"unknown endpoint {path}")
        except RequestError as exc:
            await respond(send, exc.status, exc.message.encode(), TEXT)
        except PersistenceFailed as exc:
            await respond(send, 500, str(exc).encode(), TEXT)
        except ClientGone:
            pass
