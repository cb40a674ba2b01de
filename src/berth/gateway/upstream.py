"""Pooled keep-alive HTTP/1.1 connections to upstream servers.

Hand-written on asyncio.Protocol + httptools' response parser: the proxy needs
response bytes pushed straight into the client transport from the parser
callback, and both directions throttled by transport write buffers. Client
libraries (httpx, aiohttp) hand bodies to a coroutine chunk by chunk, which
costs several task switches per chunk and cannot pause the client socket.

One ``UpstreamConnection`` carries one exchange at a time; its sink (the
proxy's ``Exchange``) receives the head, body chunks, completion or failure
through plain method calls.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools

from berth.gateway.errors import (
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from berth.gateway.headers import may_be, name_lengths

if TYPE_CHECKING:
    # The one sink: typed as the class, not a Protocol, so the compiled build
    # (setup.py) calls its methods directly instead of looking each up by name.
    from berth.gateway.exchange import Exchange


_FRAMING_LENGTHS: Final = name_lengths((b"content-length", b"transfer-encoding"))


# nginx's proxy_buffer_size is 4-8 KiB and Envoy's limit 60 KiB: a head past
# this is a broken or hostile upstream, not a response to buffer.
MAX_RESPONSE_HEAD: Final = 64 << 10


class HeadTooLarge(Exception):
    """Raised from a parser callback: the upstream's response head is over the limit."""


class ConnState(enum.Enum):
    IDLE = "idle"
    ACTIVE = "active"
    CLOSED = "closed"


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.state = ConnState.IDLE
        self.transport: asyncio.Transport | None = None
        self.sink: Exchange | None = None
        self.requests = 0  # exchanges started on this connection (>0 means reused)
        self.idle_since = 0.0
        self.received_any = False  # response bytes seen for the current exchange
        self.upgraded = False
        self.write_paused = False
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = False
        self._parser_dirty = False
        self._informational = False
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        # The response head's size, bounded by MAX_RESPONSE_HEAD: the fields
        # parsed (a head that ends within one read), and the bytes read while
        # the head is not complete (one endless line over many reads).
        self._field_bytes = 0
        self._head_read = 0
        self.chunked = False
        self.codings = b""  # transfer codings other than chunked, as in the response
        self.has_length = False  # the response has a Content-Length (httptools checked it)
        self.keep_alive = True
        self._read_timeout = 0.0
        self._send_timeout = 0.0
        self._sent = False
        self.last_read = 0.0  # loop clock at the last read (or request sent)
        self._paused_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._loop = asyncio.get_running_loop()
        # Read once per read callback (``last_read``); see ClientProtocol._time.
        self._time: Callable[[], float] = self._loop.time

    def __repr__(self) -> str:
        return f"<UpstreamConnection {self.key} {self.state.value} requests={self.requests}>"

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not a subclass of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.last_read = self._time()

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = ConnState.CLOSED
        self.pool.forget(self)
        self._cancel_timer()
        sink, self.sink = self.sink, None
        if sink is None or was is not ConnState.ACTIVE:
            return
        if self.upgraded:
            sink.on_response_complete(self)
            return
        # A close-delimited body ends with the connection.
        if self.status and not self.has_length and not self.chunked and exc is None:
            sink.on_response_complete(self)
            return
        detail = f": {exc}" if exc else ""
        sink.on_upstream_error(
            self, UpstreamClosed(f"upstream {self.key} closed the connection{detail}")
        )

    def data_received(self, data: bytes) -> None:
        self.last_read = self._time()
        self.received_any = True
        if self.upgraded:
            if self.sink is not None:
                self.sink.on_upgraded_data(data)
            return
        if self.state is not ConnState.ACTIVE:
            # Bytes while idle: the server broke protocol; never reuse it.
            self.close()
            return
        # Everything one read produces for the client (head, body, last chunk)
        # goes out in one writev instead of a syscall per piece.
        sink = self.sink
        if sink is not None:
            sink.cork()
        in_head = self.status == 0  # the final response's head is not complete yet
        try:
            self._parser.feed_data(data)
            if in_head and self.status == 0:
                self._head_read += len(data)
                if self._head_read > MAX_RESPONSE_HEAD:
                    raise httptools.HttpParserError(f"response head over {MAX_RESPONSE_HEAD} bytes")
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            rest = data[upgrade.args[0] :]
            if rest and self.sink is not None:
                self.sink.on_upgraded_data(rest)
        except httptools.HttpParserError as exc:
            # A callback's own error (a head too large) names the problem itself.
            reason = exc.__context__ if isinstance(exc.__context__, HeadTooLarge) else exc
            self.fail(UpstreamProtocolError(f"upstream {self.key} sent a bad response: {reason}"))
        finally:
            if sink is not None:
                sink.uncork()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._paused_since = self._loop.time()
        if self.sink is not None:
            self.sink.pause_request_body()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.sink is not None:
            self.sink.resume_request_body()

    # -- httptools callbacks ------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        self._field_bytes += len(name) + len(value) + 4
        if self._field_bytes > MAX_RESPONSE_HEAD:
            raise HeadTooLarge(f"response head over {MAX_RESPONSE_HEAD} bytes")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # 1xx informational responses (103 Early Hints...) are not forwarded.
            self._informational = True
            self.headers = []
            self._field_bytes = 0
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        if status == 101:
            # httptools reports the switch after this callback (HttpParserUpgrade);
            # mark it now so on_message_complete does not recycle the connection.
            self.upgraded = True
        for name, value in self.headers:
            if not may_be(name, _FRAMING_LENGTHS):
                continue  # not a framing header
            lname = name.lower()
            if lname == b"content-length":
                self.has_length = True
            elif lname == b"transfer-encoding":
                # "gzip, chunked": the gateway undoes the chunking (and re-chunks
                # for the client); the other codings stay on the body as sent.
                codings = [c.strip() for c in value.lower().split(b",")]
                self.chunked = codings[-1] == b"chunked"
                self.codings = b", ".join(c for c in codings if c and c != b"chunked")
        if self.sink is not None:
            self.sink.on_response_head(self)
        if self._head_only or status in (204, 304):
            # No body follows a HEAD response whatever it declares; httptools
            # cannot be told that, so a fresh parser reads the next response.
            self._parser_dirty = self._head_only
            self._complete()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None and self.state is ConnState.ACTIVE and not self._head_only:
            self.sink.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self.state is ConnState.ACTIVE and not self.upgraded:
            self._complete()

    # -- driving an exchange ------------------------------------------------

    def begin(
        self,
        sink: Exchange,
        head: bytes,
        *,
        head_only: bool,
        read: float,
        send: float,
        now: float,
    ) -> None:
        """Start an exchange: write the request head; body follows through ``write``."""
        assert self.state is ConnState.IDLE and self.transport is not None
        self.state = ConnState.ACTIVE
        self.requests += 1
        self.sink = sink
        if self._parser_dirty:
            self._parser = httptools.HttpResponseParser(self)
            self._parser_dirty = False
        self._head_only = head_only
        self.received_any = False
        self.status = 0
        self.reason = b""
        self.headers = []
        self._field_bytes = 0
        self._head_read = 0
        self.chunked = False
        self.codings = b""
        self.has_length = False
        self._read_timeout = read
        self._send_timeout = send
        self.last_read = now
        self._sent = False
        self.transport.write(head)
        # The timer outlives exchanges (re-armed only when it would fire too late):
        # a new TimerHandle per request costs more than an early check.
        due = now + min(read, send)
        if self._timer is None or self._timer_due > due:
            if self._timer is not None:
                self._timer.cancel()
            self._arm_timer(due)

    def write(self, data: bytes) -> None:
        if self.transport is not None and self.state is ConnState.ACTIVE:
            self.transport.write(data)

    def request_sent(self, now: float) -> None:
        """The whole request is written: the read timeout counts from ``now``.

        Before that the client may still be trickling its body, which the
        client-side body timeout governs, not the upstream's read timeout."""
        self.last_read = now
        self._sent = True

    def pause_reading(self) -> None:
        if self.transport is not None and self.state is not ConnState.CLOSED:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.state is not ConnState.CLOSED:
            self.transport.resume_reading()

    def close(self) -> None:
        if self.state is not ConnState.CLOSED:
            self.state = ConnState.CLOSED
            self.sink = None
            self._cancel_timer()
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.sink = None
        if self.transport is not None:
            self.transport.abort()
        self.close()

    def _complete(self) -> None:
        sink, self.sink = self.sink, None
        self.state = ConnState.IDLE
        # A response that came before the whole request was sent (an early 413,
        # say) leaves the server mid-request: that connection cannot be reused.
        # Back in the pool before the sink hears of it: the sink may start the
        # client's next (pipelined) request right away, on this connection.
        if self.keep_alive and not self.upgraded and self._sent:
            self.pool.release(self)
        else:
            self.close()
        if sink is not None:
            sink.on_response_complete(self)

    def fail(self, exc: UpstreamError) -> None:
        """End the exchange with ``exc`` (also for a sink that refuses the response)."""
        sink = self.sink
        self.abort()
        if sink is not None:
            sink.on_upstream_error(self, exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timeouts(self) -> None:
        # Re-armed on expiry rather than on every read: rescheduling per chunk
        # would cost more than the check.
        self._timer = None
        if self.state is not ConnState.ACTIVE or self.upgraded:
            return
        now = self._loop.time()
        if self.write_paused and now - self._paused_since >= self._send_timeout:
            self.fail(UpstreamTimeout(f"upstream {self.key} did not accept the request in time"))
            return
        if not self._sent:
            self.last_read = now
        elif now - self.last_read >= self._read_timeout:
            self.fail(
                UpstreamTimeout(f"upstream {self.key} sent nothing for {self._read_timeout:g}s")
            )
            return
        due = self.last_read + self._read_timeout
        if self.write_paused:
            due = min(due, self._paused_since + self._send_timeout)
        self._arm_timer(due)

    def _arm_timer(self, due: float) -> None:
        self._timer = self._loop.call_at(due, self._check_timeouts)
        self._timer_due = due


class UpstreamPool:
    """Idle keep-alive connections per server ("host:port"), newest reused first."""

    def __init__(self, *, max_idle: int, idle_timeout: float) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self.opened = 0

    def __repr__(self) -> str:
        idle = sum(len(q) for q in self._idle.values())
        return f"<UpstreamPool connections={len(self._all)} idle={idle} opened={self.opened}>"

    def idle_count(self, key: str | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(q) for q in self._idle.values())

    def idle_connection(self, key: str) -> UpstreamConnection | None:
        """The most recently used idle connection to server ``key`` ("host:port"), if any."""
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.state is ConnState.IDLE:
                return conn
        return None

    async def connect(
        self, key: str, host: str, port: int, connect_timeout: float
    ) -> UpstreamConnection:
        """A new connection to ``host``:``port``, pooled under ``key`` (the
        server's address, as ``idle_connection`` is asked for it)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: UpstreamConnection(self, key), host, port
                )
        except TimeoutError:
            raise UpstreamTimeout(
                f"connecting to upstream {key} took over {connect_timeout:g}s"
            ) from None
        except OSError as exc:
            reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
            raise UpstreamConnectError(f"cannot connect to upstream {key}: {reason}") from None
        self.opened += 1
        self._all.add(proto)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle_timeout / 2, self._sweep)
        return proto

    def release(self, conn: UpstreamConnection) -> None:
        queue = self._idle.get(conn.key)
        if queue is None:
            queue = self._idle[conn.key] = deque()
        if len(queue) >= self.max_idle:
            conn.close()
            return
        # Released from its read callback: last_read is now, on the loop's
        # clock, which is the monotonic clock _sweep reads.
        conn.idle_since = conn.last_read
        queue.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        queue = self._idle.get(conn.key)
        if queue is not None:
            try:
                queue.remove(conn)
            except ValueError:
                pass

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - self.idle_timeout
        for queue in list(self._idle.values()):
            # Oldest first: the deque is ordered by release time.
            while queue and queue[0].idle_since <= cutoff:
                queue.popleft().close()
        if self._all:
            self._sweeper = asyncio.get_running_loop().call_later(
                self.idle_timeout / 2, self._sweep
            )

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
