"""SQLite persistence with group commit.

Writes are applied to memory first; their ``Changes`` join the open batch and
one writer thread commits each batch in one transaction. A write is
acknowledged only after its batch's COMMIT returned, so everything the store
said yes to survives kill -9 (WAL + synchronous=NORMAL) or power loss (FULL).
While the thread commits one batch the next one fills up: under load, many
writes share a commit.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import orjson

from berth.store.model import Check, Entry, Service, Session
from berth.store.state import Changes

log = logging.getLogger("berth.store.persist")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value BLOB, flags INTEGER NOT NULL,
    create_index INTEGER NOT NULL, modify_index INTEGER NOT NULL,
    lock_index INTEGER NOT NULL, session TEXT
);
CREATE TABLE IF NOT EXISTS tombstones (key TEXT PRIMARY KEY, idx INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL, id TEXT NOT NULL, doc BLOB NOT NULL, PRIMARY KEY (kind, id)
);
"""

KINDS: dict[str, type[Session] | type[Service] | type[Check]] = {
    "session": Session,
    "service": Service,
    "check": Check,
}


class PersistenceFailed(RuntimeError):
    """A commit failed: memory is ahead of disk, so the store refuses further writes."""


@dataclass(slots=True)
class Snapshot:
    index: int
    entries: list[Entry]
    tombstones: dict[str, int]
    objects: list[Session | Service | Check]
    indexes: dict[str, int]


@dataclass(slots=True)
class Batch:
    future: asyncio.Future[None]
    changes: list[Changes] = field(default_factory=list)
    reaped: list[str] = field(default_factory=list)


def _encode(obj: Session | Service | Check) -> bytes:
    return orjson.dumps(obj.to_doc() if not isinstance(obj, Session) else obj.doc())


class Persistence:
    def __init__(
        self,
        path: Path,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        on_commit: Callable[[list[Changes]], None] | None = None,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self._on_commit = on_commit
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._open: Batch | None = None
        self._inflight: Batch | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: BaseException | None = None
        self.commits = 0

    def __repr__(self) -> str:
        state = "failed" if self.failed else "open" if self._thread else "closed"
        return f"<Persistence {self.path} {state} commits={self.commits}>"

    def open(self) -> Snapshot:
        """Open (creating if needed) the database and read everything it holds."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.executescript(SCHEMA)
        self._db = db
        indexes = dict(db.execute("SELECT name, value FROM meta").fetchall())
        entries = [
            Entry(k, v, f, ci, mi, li, s)
            for k, v, f, ci, mi, li, s in db.execute(
                "SELECT key, value, flags, create_index, modify_index, lock_index, session FROM kv"
            )
        ]
        tombstones = dict(db.execute("SELECT key, idx FROM tombstones").fetchall())
        objects: list[Session | Service | Check] = [
            KINDS[kind].from_doc(orjson.loads(doc))
            for kind, doc in db.execute("SELECT kind, doc FROM objects")
        ]
        index = indexes.pop("index", 0)
        return Snapshot(index, entries, tombstones, objects, indexes)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="berth-store-writer", daemon=True)
        self._thread.start()

    def barrier(self) -> asyncio.Future[None] | None:
        """The future of the newest uncommitted batch, if any (reads wait on it)."""
        batch = self._open or self._inflight
        return batch.future if batch else None

    def raise_if_failed(self) -> None:
        if self.failed is not None:
            raise PersistenceFailed(f"store persistence failed earlier: {self.failed!r}")

    def submit(self, changes: Changes) -> asyncio.Future[None]:
        """Queue ``changes`` into the open batch; the future resolves after COMMIT."""
        self.raise_if_failed()
        with self._lock:
            batch = self._batch()
            batch.changes.append(changes)
            return batch.future

    def reap(self, keys: list[str]) -> None:
        """Forget tombstones on disk too (no index moves: nothing visible changed)."""
        if keys and self.failed is None:
            with self._lock:
                self._batch().reaped.extend(keys)

    def _batch(self) -> Batch:
        # Called with the lock held, so the writer cannot take a half-filled batch.
        assert self._loop is not None
        if self._open is None:
            self._open = Batch(self._loop.create_future())
            self._wakeup.notify()
        return self._open

    async def close(self) -> None:
        """Commit what is queued, stop the writer thread and close the database."""
        with self._lock:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- writer thread -------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._open is None and not self._closing:
                    self._wakeup.wait()
                batch = self._open
                if batch is None:
                    return
                # In-flight first: barrier() reads without the lock and must
                # never see neither batch while this one is uncommitted.
                self._inflight = batch
                self._open = None
            error: BaseException | None = None
            try:
                self._commit(batch)
            except BaseException as exc:
                log.exception("store commit failed; refusing further writes")
                error = exc
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._resolve, batch, error)

    def _resolve(self, batch: Batch, error: BaseException | None) -> None:
        with self._lock:
            if self._inflight is batch:
                self._inflight = None
        if error is not None:
            self.failed = error
            if not batch.future.done():
                batch.future.set_exception(PersistenceFailed(f"commit failed: {error!r}"))
            return
        self.commits += 1
        if self._on_commit is not None and batch.changes:
            self._on_commit(batch.changes)
        if not batch.future.done():
            batch.future.set_result(None)

    def _commit(self, batch: Batch) -> None:
        db = self._db
        assert db is not None
        merged = Changes(0)
        # Per key, its final state and the index of the write that left it so:
        # a deleted key's tombstone carries the index of the delete.
        final: dict[str, tuple[Entry | None, int]] = {}
        for changes in batch.changes:
            merged.merge(changes)
            for key, entry in changes.kv.items():
                final[key] = (entry, changes.index)
        upserts = [
            (k, e.value, e.flags, e.create_index, e.modify_index, e.lock_index, e.session)
            for k, (e, _) in final.items()
            if e is not None
        ]
        tombstones = [(k, idx) for k, (e, idx) in final.items() if e is None]
        objects = [(k, i, _encode(o)) for (k, i), o in merged.objects.items() if o is not None]
        dropped = [(k, i) for (k, i), o in merged.objects.items() if o is None]
        meta = list(merged.indexes.items())
        if merged.index:
            meta.append(("index", merged.index))
        db.execute("BEGIN")
        try:
            if batch.reaped:
                db.executemany("DELETE FROM tombstones WHERE key=?", [(k,) for k in batch.reaped])
            if upserts:
                db.executemany("INSERT OR REPLACE INTO kv VALUES (?,?,?,?,?,?,?)", upserts)
                db.executemany("DELETE FROM tombstones WHERE key=?", [(u[0],) for u in upserts])
            if tombstones:
                db.executemany("DELETE FROM kv WHERE key=?", [(k,) for k, _ in tombstones])
                db.executemany("INSERT OR REPLACE INTO tombstones VALUES (?,?)", tombstones)
            if objects:
                db.executemany("INSERT OR REPLACE INTO objects VALUES (?,?,?)", objects)
            if dropped:
                db.executemany("DELETE FROM objects WHERE kind=? AND id=?", dropped)
            if meta:
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?,?)", meta)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
