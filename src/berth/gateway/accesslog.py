"""The access log: one JSON line per request, written off the request path.

The proxy formats each record into its JSON line on the event loop (a few
microseconds, with the C string escaper json uses) and appends it to a list;
a background task hands large batches to a thread that only appends them to
the file, so disk stalls never block the event loop. Serializing in the
thread would cost the same CPU plus GIL contention with the event loop. The
buffer is bounded: when the writer cannot keep up, records are dropped and
counted (``access_log_dropped_total``) rather than growing memory
without limit. Rotation is by size (access.log -> access.log.1 -> ...); workers
share the file, so rotation happens under a lock file and each worker reopens
when the name points at a new inode.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Final

from berth.gateway.metrics import METRICS, Metrics

log = logging.getLogger("berth.gateway.accesslog")

FLUSH_INTERVAL: Final = 0.2
FLUSH_BATCH: Final = 1024  # lines: about 200 KiB, one thread hand-off and one write()

# json.dumps' own C escaper for one string (quotes included); ensure_ascii=False
# semantics, as the file is UTF-8.
quote = json.encoder.encode_basestring

# Bytes made only of these need no JSON escaping: printable ASCII but `"` and `\`.
_PLAIN: Final = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')
_TEXT_CACHE: Final[dict[str, bytes]] = {}


def json_bytes(value: bytes) -> bytes:
    """A request's bytes (path, Host, User-Agent...) as the inside of a JSON
    string. The common case, plain ASCII, is returned as it is: one scan in C
    and no copy. Other bytes are read as Latin-1, so nothing is lost, and
    escaped."""
    if not value.translate(None, _PLAIN):
        return value
    return quote(value.decode("latin-1"))[1:-1].encode()


def json_text(text: str) -> bytes:
    """A JSON string (quotes included) for names from the configuration (route,
    cluster, upstream address): few distinct values, so each is made once."""
    quoted = _TEXT_CACHE.get(text)
    if quoted is None:
        if len(_TEXT_CACHE) >= 4096:  # route and server churn must not grow it forever
            _TEXT_CACHE.clear()
        quoted = _TEXT_CACHE[text] = quote(text).encode()
    return quoted


# One access-log line: the fields that change with each request, then the
# connection's context (LogContext), made once and reused while it repeats.
LINE: Final = (
    b'{"time":"%s","request_id":"%s","path":"%s","status":%d,"upstream_status":%s,'
    b'"tries":%d,"request_bytes":%d,"response_bytes":%d,"request_time":%.3f,'
    b'"upstream_time":%.3f,%s}\n'
)
_CONTEXT: Final = (
    b'"client_ip":%s,"host":"%s","method":"%s","route":%s,"cluster":%s,'
    b'"upstream_addr":%s,"user_agent":"%s"'
)


class LogContext:
    """The part of a connection's access-log lines that repeats from request
    to request: client, Host, User-Agent, method, route, cluster and upstream.
    Made again only when one of them changes, which saves escaping and
    formatting seven fields per request (the line's %-format is the access
    log's largest cost)."""

    __slots__ = ("_addr", "_agent", "_client_ip", "_cluster", "_host", "_method", "_route", "_text")

    def __init__(self, client_ip: str) -> None:
        self._client_ip = quote(client_ip).encode()
        self._host = self._agent = self._method = b""
        self._route = self._cluster = self._addr = ""
        self._text = b""

    def __call__(
        self, host: bytes, agent: bytes, method: bytes, route: str, cluster: str, addr: str
    ) -> bytes:
        # Route, cluster and address are the configuration's own strings:
        # the same objects while the configuration stands.
        if (
            route is not self._route
            or cluster is not self._cluster
            or addr is not self._addr
            or host != self._host
            or agent != self._agent
            or method != self._method
            or not self._text
        ):
            self._host, self._agent, self._method = host, agent, method
            self._route, self._cluster, self._addr = route, cluster, addr
            self._text = _CONTEXT % (
                self._client_ip,
                json_bytes(host),
                method,  # one of the methods the parser knows: plain letters
                json_text(route or "-"),
                json_text(cluster or "-"),
                json_text(addr or "-"),
                json_bytes(agent),
            )
        return self._text


class IsoClock:
    """ISO-8601 UTC timestamps with milliseconds, for a clock that mostly moves
    forward by less than a millisecond between calls: the text is made once per
    millisecond, the seconds part once per second."""

    __slots__ = ("_millis", "_prefix", "_second", "_text")

    def __init__(self) -> None:
        self._millis = -1
        self._second = -1
        self._prefix = ""
        self._text = b""

    def __call__(self, stamp: float) -> bytes:
        millis = int(stamp * 1000)
        if millis != self._millis:
            self._millis = millis
            second, ms = divmod(millis, 1000)
            if second != self._second:
                self._second = second
                self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._text = f"{self._prefix}.{ms:03d}Z".encode()
        return self._text


class AccessLog:
    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        backups: int,
        max_pending: int,
        metrics: Metrics = METRICS,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_pending = max_pending
        self.metrics = metrics
        self._pending: list[bytes] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None
        self._closing = False

    def __repr__(self) -> str:
        running = self._task is not None and not self._task.done()
        return f"<AccessLog {self.path} pending={len(self._pending)} running={running}>"

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._run(), name="access-log-writer")

    def write(self, entry: bytes) -> None:
        """Queue one line (ending in a newline), as made by ``line``."""
        if len(self._pending) >= self.max_pending:
            self.metrics.access_log_dropped += 1
            return
        self._pending.append(entry)
        if len(self._pending) >= FLUSH_BATCH:
            self._wake.set()

    async def stop(self) -> None:
        """Write everything still buffered, then close the file."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def flush(self) -> None:
        while self._pending:
            await self._write_pending()

    async def _write_pending(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            await asyncio.to_thread(self._write_batch, batch)

    async def _run(self) -> None:
        # One batch per wake-up (a full batch or the interval), never a loop
        # chasing what arrived during the last write: under load that turned
        # into a hand-off to the thread every few requests.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_INTERVAL)
            self._wake.clear()
            try:
                await self._write_pending()
            except OSError as exc:  # a full disk must not take the gateway down
                log.error("access log write failed: %s", exc)
        await self.flush()

    # -- writer thread ------------------------------------------------------

    def _write_batch(self, lines: list[bytes]) -> None:
        fd = self._open()
        size = os.fstat(fd).st_size
        pending: list[bytes] = []
        pending_size = 0
        for line in lines:
            if size + pending_size + len(line) > self.max_bytes and size + pending_size > 0:
                self._append(fd, pending)
                fd = self._rotate()
                size = os.fstat(fd).st_size
                pending, pending_size = [], 0
            pending.append(line)
            pending_size += len(line)
        self._append(fd, pending)
        self.metrics.access_log_written += len(lines)

    @staticmethod
    def _append(fd: int, lines: list[bytes]) -> None:
        # One write() per run of lines: O_APPEND keeps runs from different
        # workers from interleaving inside a line.
        view = memoryview(b"".join(lines))
        while view:
            # Not `view[os.write(fd, view):]`: compiled (setup.py), a call in
            # a slice bound runs twice, and this one would write twice.
            written = os.write(fd, view)
            view = view[written:]

    def _open(self) -> int:
        if self._fd is not None:
            try:
                if self.path.stat().st_ino == os.fstat(self._fd).st_ino:
                    return self._fd
            except FileNotFoundError:
                pass
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def _rotate(self) -> int:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # Another worker may have rotated while we waited for the lock.
            if self.path.stat().st_size > 0 and self._needs_rotation():
                for n in range(self.backups - 1, 0, -1):
                    src = self.path.with_name(f"{self.path.name}.{n}")
                    if src.exists():
                        src.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
                self.path.replace(self.path.with_name(self.path.name + ".1"))
        return self._open()

    def _needs_rotation(self) -> bool:
        assert self._fd is not None
        try:
            same = self.path.stat().st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False
        return same
