"""The client side of the proxy: one asyncio.Protocol per client connection.

Per-connection state (transport, parser, pipeline, timers, flow control) lives
on ``ClientProtocol``; per-request state lives on ``Exchange``, which also
receives the upstream's response callbacks and writes them to the client.
Bodies never pass through a coroutine: parser callbacks on one side write to
the transport of the other, and each side pauses the other's reading when its
write buffer is full, so a connection holds a bounded amount of body at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, cast

import httptools

from berth.gateway import limits as limits_mod
from berth.gateway.accesslog import LINE, AccessLog, IsoClock, LogContext, json_bytes
from berth.gateway.cluster import Cluster, Server
from berth.gateway.config import GatewayConfig
from berth.gateway.errors import (
    BadRequest,
    ClientGone,
    ExpectationFailed,
    GatewayError,
    HeadersTooLarge,
    MethodNotAllowed,
    NoServer,
    RequestTimeout,
    RouteNotFound,
    UpstreamClosed,
    UpstreamError,
    UpstreamTimeout,
    URITooLong,
)
from berth.gateway.exchange import (
    ClientBodyFailed,
    Exchange,
    ExchangeState,
    retry_status,
    should_retry,
)
from berth.gateway.headers import may_be, name_lengths, upstream_request_head
from berth.gateway.metrics import METRICS, Metrics
from berth.gateway.routes import Route, RoutingTable
from berth.gateway.upstream import UpstreamConnection, UpstreamPool

log = logging.getLogger("berth.gateway.proxy")

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# nginx logs 499 when the client went away before the response was complete.
CLIENT_CLOSED: Final = 499
# nginx's lingering_time / lingering_timeout: how long, and how long between
# reads, a closing connection still reads (and drops) what the client sends.
LINGER_TIME: Final = 30.0
LINGER_TIMEOUT: Final = 5.0
# A request body the response did not need (an upstream that answered early, a
# 404) is read and dropped so the connection can serve the next request, as
# nginx's discard_request_body does, unless more than this much is left.
DISCARD_BODY_MAX: Final = 1 << 20
# Up to this much, what one upstream read produces for the client is joined
# into one write rather than handed to writelines.
JOIN_MAX: Final = 16 << 10


class TableSource(Protocol):
    """Where the current routing table comes from (Discovery, or a fixed one in tests)."""

    @property
    def table(self) -> RoutingTable: ...


@dataclass
class ProxyContext:
    """What every connection of one worker shares.

    The types of its fields are imported at run time, not under TYPE_CHECKING:
    the compiled build (setup.py) resolves a dataclass's field types when the
    module loads."""

    config: GatewayConfig
    routes: TableSource
    pool: UpstreamPool
    access_log: AccessLog | None = None
    metrics: Metrics = METRICS
    rate: limits_mod.RateLimiter = field(default_factory=limits_mod.RateLimiter)
    concurrency: limits_mod.ConcurrencyLimiter = field(
        default_factory=limits_mod.ConcurrencyLimiter
    )
    connections: set[ClientProtocol] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # requests on the slow path
    draining: bool = False
    on_idle: Callable[[], None] | None = None  # called when the last connection closes
    clock: IsoClock = field(default_factory=IsoClock)  # access log timestamps
    _wall_offset: float = 0.0  # wall clock minus monotonic clock (see wall())
    _wall_synced: float = -1.0  # loop time the offset was last read at
    # Request ids: random per worker, then a counter (unique without a uuid per request).
    _id_prefix: bytes = field(default_factory=lambda: os.urandom(6).hex().encode())
    _id_counter: int = 0
    _id_base: bytes = b""  # the prefix and all but the counter's last three hex digits

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A request's coroutine (the slow path), tracked so shutdown can await it."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def wall(self, stamp: float) -> float:
        """``stamp``, a time on the event loop's clock, as wall-clock time.

        The loop's clock is the monotonic one (uvloop reads it in
        milliseconds), so the offset between the two is read once a second
        rather than per request: a step of the wall clock shows within a
        second, as with nginx's cached time."""
        if not self._wall_synced <= stamp < self._wall_synced + 1.0:
            self._wall_offset = time.time() - time.monotonic()
            self._wall_synced = stamp
        return stamp + self._wall_offset

    def next_request_id(self) -> bytes:
        """The prefix, then the counter in 12 hex digits: made as a base that
        changes every 4096 ids and a ready-made suffix, instead of a %-format
        per request."""
        n = self._id_counter = self._id_counter + 1
        if n & 0xFFF == 0 or not self._id_base:
            self._id_base = b"%s%09x" % (self._id_prefix, n >> 12)
        return self._id_base + _ID_SUFFIXES[n & 0xFFF]


# Names of the request headers on_headers_complete reads.
_REQUEST_READ_LENGTHS: Final = name_lengths(
    (b"host", b"content-length", b"transfer-encoding", b"expect", b"connection",
     b"x-request-id", b"user-agent", b"upgrade")
)  # fmt: skip
_ID_SUFFIXES: Final = tuple(b"%03x" % i for i in range(4096))


class _InFlight:
    """A first attempt started synchronously by the fast path.

    A plain class, not a dataclass: compiled (setup.py), a dataclass keeps the
    interpreted __init__ the dataclasses module writes, and this one is made
    for every request."""

    __slots__ = ("cluster", "conn", "head", "route", "server", "started")

    def __init__(
        self,
        route: Route,
        cluster: Cluster,
        server: Server,
        head: bytes,
        conn: UpstreamConnection | None,  # None: no idle connection, the coroutine connects
        started: float,
    ) -> None:
        self.route = route
        self.cluster = cluster
        self.server = server
        self.head = head
        self.conn = conn
        self.started = started


class ClientProtocol(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.config = cfg = ctx.config
        # Read for every request (some for every header): the config is a
        # pydantic model, whose attribute reads are generic lookups; these
        # copies are struct fields in the compiled build.
        self._max_url_bytes = cfg.limit_url_bytes
        self._max_header_bytes = cfg.limit_header_bytes
        self._max_header_count = cfg.limit_header_count
        self._max_head_bytes = cfg.limit_header_bytes + cfg.limit_url_bytes
        self._header_timeout = cfg.client_header_timeout
        self._idle_timeout = cfg.client_idle_timeout
        self.loop = asyncio.get_running_loop()
        # The loop's clock, read once per read callback (``_last_data``) and
        # passed down from there: a clock read costs a call and a float.
        self._time: Callable[[], float] = self.loop.time
        self.transport: asyncio.Transport | None = None
        self.client_ip = "-"
        self._log_context = LogContext(self.client_ip)
        self.parser = httptools.HttpRequestParser(self)
        self.high_water = ctx.config.buffer_high_water
        self.current: Exchange | None = None  # the exchange being answered
        self.parsing: Exchange | None = None  # the exchange whose request is being read
        self.pipeline: deque[Exchange] = deque()
        self.closing = False
        self.write_paused = False
        self._paused: set[str] = set()
        self._tunnel: Exchange | None = None
        self._discarding: Exchange | None = None  # answered; its body is read and dropped
        self._discard_until = 0  # body_bytes past which discarding gives up and closes
        self._corked: list[bytes] | None = None
        self._failed = False
        self._linger_since = 0.0  # set once the response is out and input is being dropped
        # Request head being parsed.
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._header_bytes = 0
        self._in_head = False
        # Timers: one handle, re-armed on expiry (see _check_timers).
        self._last_data = self._time()
        self._head_started = 0.0
        self._write_paused_since = 0.0
        self._idle_since = self._last_data
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0  # when _timer fires (a struct field, not a call to when())
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<ClientProtocol {self.client_ip} current={self.current!r} head={self._in_head} "
            f"pipeline={len(self.pipeline)} paused={sorted(self._paused)} closing={self.closing}>"
        )

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not a subclass of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip = str(peer[0])
        self._log_context = LogContext(self.client_ip)
        self.ctx.connections.add(self)
        self.ctx.metrics.connections_active += 1
        self.ctx.metrics.connections_total += 1
        self._arm_timer(self._last_data + self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.ctx.connections.discard(self)
        self.ctx.metrics.connections_active -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.current is not None:
            self.current.client_gone()
        self.pipeline.clear()
        if not self.ctx.connections and self.ctx.on_idle is not None:
            self.ctx.on_idle()

    def data_received(self, data: bytes) -> None:
        self._last_data = self._time()
        if self._linger_since:
            return
        if self._tunnel is not None:
            self._feed_tunnel(self._tunnel, data)
            return
        if self._failed:
            return
        if self._in_head or self.parsing is None:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._start_tunnel(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError as failed:
            cause = failed.__context__
            if isinstance(cause, GatewayError):
                self._fail(cause)
            else:
                log.exception("request parser callback failed", exc_info=cause)
                self._fail(BadRequest("the request could not be processed"))
        except httptools.HttpParserError as exc:
            self._fail(BadRequest(f"malformed request: {exc}"))
        else:
            if self._in_head and self._head_bytes > self._max_head_bytes:
                self._fail(HeadersTooLarge("request headers are too large"))

    def eof_received(self) -> bool | None:
        # As nginx (proxy_ignore_client_abort off): a client that closes its
        # side has given up; the request in flight is abandoned (logged 499).
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        self._write_paused_since = now = self.loop.time()
        self._timer_by(now + self.config.client_send_timeout)
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.resume_reading()

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        # Parser callbacks run inside data_received, which read the clock.
        self._head_started = now = self._last_data
        self._timer_by(now + self._header_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._max_url_bytes:
            raise URITooLong(f"request target is over {self._max_url_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            raise HeadersTooLarge(f"request headers are over {self._max_header_bytes} bytes")
        if len(self._headers) > self._max_header_count:
            raise HeadersTooLarge(f"more than {self._max_header_count} request headers")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        parser = self.parser
        ex = Exchange(self, parser.get_method(), self._url, b"", self._headers, self._last_data)
        keep_alive = parser.should_keep_alive()
        request_id = b""
        expect: bytes | None = None
        connection = False
        hosts = 0
        for name, value in ex.headers:
            if not may_be(name, _REQUEST_READ_LENGTHS):
                continue  # not a header read here
            lname = name.lower()
            if lname == b"host":
                hosts += 1
                ex.host = value
            elif lname == b"content-length":
                ex.content_length = int(value)
            elif lname == b"transfer-encoding":
                ex.chunked = True
            elif lname == b"expect":
                if expect is None or value.lower() != b"100-continue":
                    expect = value  # an unsupported one, if any, is what is answered
            elif lname == b"connection":
                connection = True
            elif lname == b"x-request-id":
                if 0 < len(value) <= 200 and value.isascii():
                    request_id = value
            elif lname == b"user-agent":
                ex.user_agent = value
            elif lname == b"upgrade":
                ex.upgrade = value
        # HTTP/1.0 keeps its connection only when asked to (Connection:
        # keep-alive), so a kept connection without a Connection header is
        # HTTP/1.1: httptools makes the version string with str.format, which
        # costs more than the rest of this loop, so it is asked only otherwise.
        ex.http10 = (connection or not keep_alive) and parser.get_http_version() == "1.0"
        ex.keep_alive = keep_alive and not self.ctx.draining
        if expect is not None and not ex.http10:  # RFC 9110 10.1.1: 1.0 ignores it
            if expect.lower() != b"100-continue":
                ex.error = ExpectationFailed(f"unsupported Expect: {expect[:100]!r}")
            ex.expect_continue = True
        if request_id:
            ex.request_id = request_id
            ex.client_request_id = True
        else:
            ex.request_id = self.ctx.next_request_id()
        if ex.upgrade is not None and not parser.should_upgrade():
            ex.upgrade = None
        if hosts > 1:
            ex.error = BadRequest("more than one Host header")
        elif hosts == 0 and not ex.http10 and not ex.url.startswith(b"http"):
            ex.error = BadRequest("HTTP/1.1 request without a Host header")
        if ex.method == b"CONNECT":
            # A reverse proxy opens no tunnels (nginx answers 405 too). The
            # parser stops after it; nothing more is read from this connection.
            ex.error = MethodNotAllowed("CONNECT is not supported")
            ex.keep_alive = False
        elif ex.url[:1] != b"/" and ex.url != b"*":
            self._absolute_form(ex)
        self.parsing = ex
        if ex.chunked or ex.content_length:
            self._timer_by(self._last_data + self.config.client_body_timeout)
        self._enqueue(ex)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.feed_body(body)
            if self._discarding is ex and ex.body_bytes > self._discard_until:
                self.close()

    def on_message_complete(self) -> None:
        ex = self.parsing
        if ex is not None:
            if ex.upgrade is None:
                self.parsing = None
            ex.body_done(self._last_data)
            if self._discarding is ex:
                self._discarding = None
                self._next(self._last_data)

    # -- helpers ------------------------------------------------------------

    def _absolute_form(self, ex: Exchange) -> None:
        try:
            # Any, not httptools' stub type: its stubs declare port, path and
            # query as never None, and the compiled build (setup.py) trusts
            # them and raises TypeError on the None an absent part gives.
            parsed: Any = httptools.parse_url(ex.url)
        except httptools.HttpParserInvalidURLError:
            ex.error = BadRequest("malformed request target")
            return
        host: bytes | None = parsed.host
        port: int | None = parsed.port
        path: bytes | None = parsed.path
        query: bytes | None = parsed.query
        if host:
            ex.host = host + (b":%d" % port if port else b"")
        ex.url = (path or b"/") + (b"?" + query if query else b"")

    def _enqueue(self, ex: Exchange) -> None:
        if self.current is None:
            self._begin(ex, ex.started)
        else:
            self.pipeline.append(ex)
            if len(self.pipeline) >= self.config.limit_pipeline:
                self.pause_reading("pipeline")

    def _begin(self, ex: Exchange, now: float) -> None:
        self.current = ex
        if not self._start_fast(ex, now):
            self._task = self.ctx.spawn(self._serve(ex))

    def _start_fast(self, ex: Exchange, now: float) -> bool:
        """Start the first attempt right here when nothing needs a coroutine (no
        limit but the body size, no 100-continue, no total timeout): most requests
        then complete from callbacks alone, without a Task. Anything unusual about
        the outcome hands the exchange to the coroutine path (``_serve``)."""
        if ex.error is not None or ex.expect_continue or ex.upgrade is not None:
            return False
        resolved = self.ctx.routes.table.resolve(
            ex.host.decode("latin-1"), ex.url.decode("latin-1")
        )
        if resolved is None:
            return False
        route, cluster = resolved
        lim = route.limits
        if lim.rate is not None or lim.max_concurrent is not None:
            return False
        if route.timeouts.total is not None:
            return False
        max_body = lim.max_body_size
        if max_body is not None and max(ex.content_length or 0, ex.body_bytes) > max_body:
            return False
        hash_key = self._hash_key(ex, route) if route.lb == "hash" else None
        server = cluster.pick(route, hash_key, ())
        if server is None:
            return False
        ex.route_name = route.name
        ex.cluster_name = cluster.name
        ex.max_body = max_body
        ex.tries = 1
        ex.upstream_addr = server.address
        ex.retry_allowed = self._more_tries(route, cluster, 1, None)
        cluster.on_request_start(server)
        pool = self.ctx.pool
        conn = pool.idle_connection(server.address)
        flight = _InFlight(route, cluster, server, self._request_head(ex), conn, now)
        if conn is None:
            self._task = self.ctx.spawn(self._serve(ex, flight))
            return True
        ex.state = ExchangeState.UPSTREAM
        t = route.timeouts
        ex.flight = flight
        ex.attach(conn, flight.head, t.read, t.send, now)
        return True

    def fast_attempt_done(
        self, ex: Exchange, flight: _InFlight, outcome: int | BaseException
    ) -> None:
        """The fast path's attempt settled (called from the upstream's callbacks)."""
        # isinstance(outcome, int), not BaseException: compiled, a check for
        # int is a type test, one for a builtins name a lookup of that name.
        if not isinstance(outcome, int) or ex.discarding:
            # A retry, an error response or a resend: the coroutine path decides
            # (its ``ex.wait()`` returns this same outcome).
            self._task = self.ctx.spawn(self._serve(ex, flight))
            return
        status = outcome
        ex.detach()
        conn = flight.conn
        assert conn is not None  # the fast path goes on only with an idle connection
        now = conn.last_read  # settled from its read callback, which read the clock
        ex.upstream_time += now - flight.started
        ok = not retry_status(status)
        flight.cluster.on_request_end(
            flight.server, ok, None if ok else f"upstream answered {status}"
        )
        self.ctx.metrics.observe_try(flight.cluster.name, "ok" if ok else str(status))
        self._finish(ex, now)

    def _fail(self, error: GatewayError) -> None:
        """The byte stream cannot be parsed any further: answer in order, then close."""
        self._failed = True
        self._in_head = False
        self.pause_reading("failed")
        ex, self.parsing = self.parsing, None
        if ex is None:
            url = self._url[:200] or b"-"
            ex = Exchange(self, b"-", url, self.ctx.next_request_id(), [], self._time())
            ex.body_complete = True
            ex.error = error
            ex.keep_alive = False
            self._enqueue(ex)
            return
        ex.keep_alive = False
        if self._discarding is ex:
            self.close()  # answered already; its body was being dropped
            return
        if ex.response_started or ex.state is ExchangeState.DONE:
            return  # the response goes on; the connection closes after it
        ex.error = ex.error or error
        conn = ex.conn
        if conn is not None:
            # Mid-body (a chunk-size error, a body over the limit): the attempt
            # in progress cannot complete, and the client gets this error instead.
            ex.on_upstream_error(conn, ClientBodyFailed(error))
            conn.abort()

    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif (
            self.transport is not None
            and not self.transport.is_closing()
            and not self._linger_since
        ):
            self.transport.write(data)

    def cork(self) -> None:
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        pieces, self._corked = self._corked, None
        if (
            pieces
            and self.transport is not None
            and not self.transport.is_closing()
            and not self._linger_since
        ):
            size = 0
            for piece in pieces:
                size += len(piece)
            if size <= JOIN_MAX:
                # One buffer for the small responses that make up most
                # traffic: uvloop writes it at once instead of building a
                # writev context (measured cheaper); large bodies are not copied.
                self.transport.write(b"".join(pieces))
            else:
                self.transport.writelines(pieces)

    def pause_reading(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume_reading(self, reason: str) -> None:
        # Called twice per request (attach, detach), nearly always unpaused:
        # an empty set is tested without hashing the reason.
        if self._paused and reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self.closing:
                self.transport.resume_reading()

    def closes_after_current(self) -> bool:
        """Whether this connection closes once the response in progress is out:
        it is closing, or the gateway drains and no pipelined request (already
        read, so answered still) waits behind it."""
        return self.closing or (self.ctx.draining and not self.pipeline)

    def close(self) -> None:
        transport = self.transport
        first = not self.closing
        self.closing = True
        if transport is None or transport.is_closing():
            return
        # The response may still be corked (the exchange can finish from inside
        # the upstream's read callback): it goes out before the close.
        self.uncork()
        if first and self._input_unread() and transport.can_write_eof():
            self._linger(transport)
        else:
            transport.close()

    def _input_unread(self) -> bool:
        return self._failed or self._in_head or self.parsing is not None or bool(self.pipeline)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Closing with client bytes still unread would make the kernel send a
        reset, which destroys the response in flight (the 413 for an upload
        being sent): the client would only ever see "connection reset". As
        nginx's lingering close: send FIN after the response, read and drop
        until the client closes, for a bounded time."""
        self.uncork()
        self._linger_since = now = self.loop.time()
        self._failed = True
        transport.write_eof()
        self._paused.clear()
        transport.resume_reading()
        self._timer_by(now + LINGER_TIMEOUT)

    def shutdown(self) -> None:
        """Draining (ctx.draining is set): busy connections close after their
        current response, which carries Connection: close. Idle ones stay open
        until ``close_if_idle``: closing a keep-alive connection races a request
        the client may already have sent on it, which would be lost."""
        if self.current is not None or self.parsing is not None:
            self.pause_reading("drain")

    def close_if_idle(self) -> None:
        # A connection in the middle of a request head is not idle: that
        # request is answered (with Connection: close), bounded by the header timeout.
        if self.current is None and self.parsing is None and not self._in_head:
            self.close()

    # -- upgrade tunnel -----------------------------------------------------

    def _start_tunnel(self, rest: bytes) -> None:
        ex = self.parsing
        if ex is None:
            # CONNECT: its 405 is queued already and closes the connection.
            self._failed = True
            self.pause_reading("failed")
            return
        self._tunnel = ex
        self.parsing = None
        if rest:
            self._feed_tunnel(ex, rest)

    def _feed_tunnel(self, ex: Exchange, data: bytes) -> None:
        ex.body_bytes += len(data)
        conn = ex.conn
        if conn is not None and conn.upgraded:
            conn.write(data)
        elif not ex.response_started:
            # Until the upstream answers 101 these bytes are not HTTP the gateway
            # has checked: sent now, a declined upgrade would have the upstream
            # read them as further requests on a connection that goes back to
            # the pool (request smuggling). Exchange.switched sends them.
            if ex.tunnel is None:
                ex.tunnel = []
            ex.tunnel.append(data)
            ex.buffered += len(data)
            if ex.buffered > self.high_water:
                self.pause_reading("buffer")

    # -- timers -------------------------------------------------------------

    def _timer_by(self, due: float) -> None:
        """Make sure the connection's timer fires no later than ``due``."""
        if self._timer is None or self._timer_due > due:
            self._arm_timer(due)

    def _arm_timer(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(due, self._check_timers)
        self._timer_due = due

    def _check_timers(self) -> None:
        """One timer per connection, re-armed at the next deadline when it fires."""
        self._timer = None
        if self.transport is None or self.transport.is_closing():
            return
        cfg = self.config
        now = self.loop.time()
        ex = self.current
        if self._linger_since:
            due = min(self._linger_since + LINGER_TIME, self._last_data + LINGER_TIMEOUT)
            if now >= due:
                self.transport.close()
                return
        elif self._in_head:
            due = self._head_started + cfg.client_header_timeout
            if now >= due and self.current is None:
                self._fail(RequestTimeout("request headers were not received in time"))
                return
            if now >= due:
                # A pipelined request behind one still being answered: the 408
                # waits its turn (the connection closes after it).
                due = now + cfg.client_header_timeout
        elif ex is None and self.parsing is None:
            due = max(self._last_data, self._idle_since) + cfg.client_idle_timeout
            if now >= due:
                self.close()  # idle keep-alive: close silently, as nginx does
                return
        elif self._tunnel is not None:
            due = now + cfg.client_idle_timeout  # tunnels are bounded by the upstream's read
        elif self.write_paused:
            due = self._write_paused_since + cfg.client_send_timeout
            if now >= due:
                log.info("client %s stopped reading its response; closing", self.client_ip)
                self._abort_current()
                return
        elif self.parsing is not None and not self.parsing.body_complete and not self._paused:
            due = self._last_data + cfg.client_body_timeout
            if now >= due:
                self._fail(RequestTimeout("request body was not received in time"))
                return
        else:
            due = now + min(cfg.client_idle_timeout, cfg.client_body_timeout)
        self._arm_timer(due)

    def abort(self) -> None:
        self._abort_current()

    def _abort_current(self) -> None:
        ex = self.current
        if ex is not None:
            ex.client_gone()
        if self.transport is not None:
            self.transport.abort()

    # -- serving one exchange ----------------------------------------------

    async def _serve(self, ex: Exchange, flight: _InFlight | None = None) -> None:
        try:
            if flight is None:
                await self._respond(ex)
            else:
                await self._guarded(ex, self._attempts(ex, flight.route, flight.cluster, flight))
        except Exception:  # the gateway never crashes on one request
            log.exception("request %s failed", ex.request_id.decode())
            if not ex.response_started:
                self._send_error(ex, GatewayError("internal gateway error"))
            else:
                self._abort_current()
        finally:
            self._finish(ex, self._time())

    async def _respond(self, ex: Exchange) -> None:
        ex.state = ExchangeState.ROUTING
        if ex.error is not None:
            self._send_error(ex, ex.error)
            return
        ctx = self.ctx
        host = ex.host.decode("latin-1")
        path = ex.url.decode("latin-1")
        resolved = ctx.routes.table.resolve(host, path)
        if resolved is None:
            self._send_error(ex, RouteNotFound(f"no route for host {host!r}"), host=host)
            return
        route, cluster = resolved
        ex.route_name = route.name
        ex.cluster_name = cluster.name
        lim = route.limits
        acquired = False
        try:
            if lim.rate is not None:
                key = self.client_ip if lim.rate_key == "ip" else ""
                ctx.rate.check(route.name, key, lim.rate, lim.burst, self.loop.time())
            if ex.content_length is not None:
                limits_mod.check_body_size(ex.content_length, lim.max_body_size)
            ex.max_body = lim.max_body_size
            if ex.body_bytes and lim.max_body_size is not None:
                limits_mod.check_body_size(ex.body_bytes, lim.max_body_size)
            if lim.max_concurrent is not None:
                ctx.concurrency.acquire(route.name, lim.max_concurrent)
                acquired = True
            if ex.expect_continue and not ex.body_complete and not ex.body_bytes:
                self.write(CONTINUE)
        except GatewayError as exc:
            self._send_error(ex, exc)
            if acquired:
                ctx.concurrency.release(route.name)
            return
        try:
            await self._guarded(ex, self._proxy(ex, route, cluster))
        finally:
            if acquired:
                ctx.concurrency.release(route.name)

    async def _guarded(self, ex: Exchange, attempts: Coroutine[Any, Any, None]) -> None:
        """Run the attempts; a failure becomes the client's error response."""
        try:
            await attempts
        except GatewayError as exc:
            if not ex.response_started:
                self._send_error(ex, exc)
            else:
                self._abort_current()
        except ClientGone:
            ex.status = ex.status or CLIENT_CLOSED

    async def _proxy(self, ex: Exchange, route: Route, cluster: Cluster) -> None:
        timeouts = route.timeouts
        if timeouts.total is None:
            await self._attempts(ex, route, cluster)
            return
        try:
            async with asyncio.timeout(timeouts.total):
                await self._attempts(ex, route, cluster)
        except TimeoutError:
            if ex.conn is not None:
                ex.conn.abort()
                ex.conn = None
            raise UpstreamTimeout(
                f"request took over the route's total timeout of {timeouts.total:g}s"
            ) from None

    def _request_head(self, ex: Exchange) -> bytes:
        if ex.chunked:
            body_kind = "chunked"
        elif ex.content_length is not None:
            # "Content-Length: 0" too: servers may answer 411 to a POST without it.
            body_kind = str(ex.content_length)
        else:
            body_kind = "none"
        return upstream_request_head(
            ex.method,
            ex.url,
            ex.headers,
            host=ex.host,
            client_ip=self.client_ip,
            request_id=ex.request_id,
            body=body_kind,
            upgrade=ex.upgrade,
        )

    @staticmethod
    def _more_tries(route: Route, cluster: Cluster, tried: int, budget: float | None) -> bool:
        # Another attempt needs another server: with none left, the last
        # answer goes to the client as it is (as nginx does).
        return (
            tried < route.tries
            and tried < len(cluster.servers)
            and (budget is None or asyncio.get_running_loop().time() < budget)
        )

    async def _attempts(
        self, ex: Exchange, route: Route, cluster: Cluster, flight: _InFlight | None = None
    ) -> None:
        ctx = self.ctx
        hash_key = self._hash_key(ex, route) if route.lb == "hash" else None
        head = flight.head if flight is not None else self._request_head(ex)
        start = flight.started if flight is not None else self.loop.time()
        budget = start + route.try_timeout if route.try_timeout > 0 else None
        tried: list[Server] = []
        last: GatewayError | None = None
        while len(tried) < route.tries:
            attached: UpstreamConnection | None = None
            server: Server | None
            if flight is not None:
                # The first attempt was started by _start_fast: pick it up as it is.
                server, attached, started = flight.server, flight.conn, flight.started
                tried.append(server)
                more = ex.retry_allowed
                flight = None
            else:
                server = cluster.pick(route, hash_key, tried)
                if server is None:
                    break
                tried.append(server)
                ex.tries += 1
                ex.upstream_addr = server.address
                more = self._more_tries(route, cluster, len(tried), budget)
                ex.retry_allowed = more
                ex.request_sent = False
                cluster.on_request_start(server)
                started = self.loop.time()
            # Not the server's fault unless shown otherwise (client gone, cancelled).
            ok, error = True, None
            try:
                status = await self._try(ex, route, server, head, attached)
                ok = not retry_status(status)
                error = None if ok else f"upstream answered {status}"
                if not ex.discarding:
                    ctx.metrics.observe_try(cluster.name, "ok" if ok else str(status))
                    return
                ctx.metrics.observe_try(cluster.name, str(status))
                last = _status_error(status, server.address)
            except ClientBodyFailed as failed:
                raise failed.cause from None
            except UpstreamError as exc:
                ok, error, last = False, exc.message, exc
                ctx.metrics.observe_try(cluster.name, exc.code)
                if not more or not should_retry(
                    error=True,
                    status=0,
                    method=ex.method,
                    replayable=ex.replayable,
                    response_started=ex.response_started,
                    request_sent=ex.request_sent,
                ):
                    raise
            except asyncio.CancelledError:
                ok, error = False, "timed out (route total timeout)"
                raise
            finally:
                ex.upstream_time += self.loop.time() - started
                cluster.on_request_end(server, ok, error)
            if not more:
                break
        if last is None:
            raise NoServer(f"cluster {cluster.name!r} has no server to take the request")
        raise last

    async def _try(
        self,
        ex: Exchange,
        route: Route,
        server: Server,
        head: bytes,
        attached: UpstreamConnection | None = None,
    ) -> int:
        """One attempt; returns the upstream status once the response is complete.
        ``attached``: the attempt is already under way on that connection."""
        t = route.timeouts
        fresh = False
        conn: UpstreamConnection | None
        while True:
            if attached is not None:
                conn, attached = attached, None
            else:
                if ex.error is not None:
                    raise ClientBodyFailed(ex.error)
                ex.state = ExchangeState.UPSTREAM
                pool = self.ctx.pool
                conn = None if fresh else pool.idle_connection(server.address)
                if conn is None:
                    conn = await pool.connect(server.address, server.host, server.port, t.connect)
                    if self.transport is None or self.transport.is_closing():
                        pool.release(conn)
                        raise ClientGone("client closed the connection")
                ex.attach(conn, head, t.read, t.send, self._time())
            try:
                return await ex.wait()
            except UpstreamClosed:
                # A pooled connection the server had already closed: resend once
                # on a new connection, which is not a failure of the server.
                if (
                    fresh
                    or conn.requests <= 1
                    or conn.received_any
                    or ex.response_started
                    or not ex.replayable
                ):
                    raise
            finally:
                ex.detach()
            fresh = True

    def _hash_key(self, ex: Exchange, route: Route) -> bytes | None:
        if route.hash_on == "ip":
            return self.client_ip.encode()
        if route.hash_on == "header":
            wanted = route.hash_header.encode()
            for name, value in ex.headers:
                if name.lower() == wanted:
                    return value
            return None
        return ex.url

    def _send_error(self, ex: Exchange, error: GatewayError, host: str | None = None) -> None:
        doc: dict[str, Any] = {"error": error.message, "status": error.status}
        if host is not None:
            doc["host"] = host
        doc["request_id"] = ex.request_id.decode("latin-1")
        body = json.dumps(doc).encode()
        # After these the byte stream cannot be trusted or is not worth reading.
        if error.status in (400, 408, 413, 414, 417, 431) or not _discardable(ex):
            ex.keep_alive = False
        lines = [
            b"HTTP/1.1 %d %s\r\n" % (error.status, _REASONS.get(error.status, b"Error")),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"X-Request-Id: " + ex.request_id + b"\r\n",
        ]
        if error.retry_after is not None:
            lines.append(b"Retry-After: %d\r\n" % error.retry_after)
        if not ex.keep_alive or self.closes_after_current():
            ex.keep_alive = False
            lines.append(b"Connection: close\r\n")
        elif ex.http10:
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        ex.status = error.status
        ex.response_started = True
        ex.response_bytes = 0 if ex.head_only else len(body)
        self.write(b"".join(lines) + (b"" if ex.head_only else body))

    def _finish(self, ex: Exchange, now: float) -> None:
        ex.state = ExchangeState.DONE
        if ex.status == 0:
            ex.status = CLIENT_CLOSED
        self._record(ex, now)
        if self.current is ex:
            self.current = None
        if self.transport is None or self.transport.is_closing():
            return
        if (
            self._tunnel is ex
            or not ex.keep_alive
            or self.closes_after_current()
            or not (ex.body_complete or _discardable(ex))
        ):
            self.close()
            return
        if not ex.body_complete:
            # The rest of the body is read and dropped; on_message_complete
            # then carries on with the next request.
            self._discarding = ex
            self._discard_until = ex.body_bytes + DISCARD_BODY_MAX
            self.resume_reading("buffer")
            self.resume_reading("upstream")
            self._timer_by(self._last_data + self.config.client_body_timeout)
            return
        self._next(now)

    def _next(self, now: float) -> None:
        """The exchange is over and the connection stays: the next request, or idle."""
        self._idle_since = now
        if self.pipeline:
            nxt = self.pipeline.popleft()
            self.resume_reading("pipeline")
            self._begin(nxt, now)
        else:
            self._timer_by(self._idle_since + self._idle_timeout)

    def _record(self, ex: Exchange, now: float) -> None:
        """Metrics and the access log line. Its time is ``now``, when the
        response ended (nginx logs that time too): records come in that order,
        so the timestamp text is made once a millisecond (IsoClock)."""
        elapsed = now - ex.started
        route = ex.route_name or "-"
        ctx = self.ctx
        ctx.metrics.observe_request(route, ex.status, elapsed, ex.body_bytes, ex.response_bytes)
        if ctx.access_log is None:
            return
        # One bytes %-format in C, with no escaping for plain ASCII values
        # (json_bytes): json.dumps of a dict costs about four times as much.
        context = self._log_context(
            ex.host, ex.user_agent, ex.method, ex.route_name, ex.cluster_name, ex.upstream_addr
        )
        ctx.access_log.write(
            LINE
            % (
                ctx.clock(ctx.wall(now)),
                json_bytes(ex.request_id) if ex.client_request_id else ex.request_id,
                json_bytes(ex.url),
                ex.status,
                b"%d" % ex.upstream_status if ex.upstream_status else b"null",
                ex.tries,
                ex.body_bytes,
                ex.response_bytes,
                elapsed * 1000,
                ex.upstream_time * 1000,
                context,
            )
        )


def _discardable(ex: Exchange) -> bool:
    """Whether what is left of the request body is small enough to read and drop
    (a chunked body is unknown: discarding it stops at DISCARD_BODY_MAX). Not a
    body behind Expect: 100-continue, which the client may never send once it
    has its answer."""
    if ex.body_complete:
        return True
    if ex.expect_continue:
        return False
    if ex.chunked:
        return True
    return ex.content_length is not None and ex.content_length - ex.body_bytes <= DISCARD_BODY_MAX


def _status_error(status: int, address: str) -> GatewayError:
    if status == 504:
        return UpstreamTimeout(f"upstream {address} answered 504")
    if status == 503:
        exc: GatewayError = UpstreamError(f"upstream {address} answered 503")
        exc.status = 503
        return exc
    return UpstreamError(f"upstream {address} answered {status}")


_REASONS: Final = {
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    417: b"Expectation Failed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}
