"""Per-request state of the proxy: one ``Exchange`` per request/response.

The exchange is also the upstream connection's sink: response
callbacks land here and are written straight to the client's transport, so
bodies never pass through a coroutine.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import TYPE_CHECKING, Final

from berth.gateway import limits as limits_mod
from berth.gateway.errors import (
    ClientGone,
    GatewayError,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
)
from berth.gateway.headers import LAST_CHUNK, chunk, client_response_head
from berth.gateway.upstream import UpstreamConnection

if TYPE_CHECKING:
    from berth.gateway.proxy import ClientProtocol, _InFlight

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def should_retry(
    *,
    error: bool,
    status: int,
    method: bytes,
    replayable: bool,
    response_started: bool,
    request_sent: bool = False,
) -> bool:
    """nginx proxy_next_upstream semantics: never once the client has response bytes;
    connect errors and 502/503/504 only when the request can be sent again, and
    a request already (maybe) processed only when its method is idempotent.
    ``request_sent``: the failed attempt got as far as writing the request (a
    read timeout or a reset, not a connect error)."""
    if response_started or not replayable:
        return False
    if error and not request_sent:
        return True
    if error:
        return method in IDEMPOTENT
    return retry_status(status) and method in IDEMPOTENT


def retry_status(status: int) -> bool:
    """502, 503 and 504: the upstream statuses worth another server, as nginx's
    proxy_next_upstream http_502 http_503 http_504 (compiled, a range test
    costs less than boxing and hashing the status for a set)."""
    return 502 <= status <= 504


class ExchangeState(enum.Enum):
    QUEUED = "queued"  # parsed, waiting behind an earlier pipelined request
    ROUTING = "routing"
    UPSTREAM = "upstream"  # talking to an upstream server
    RESPONDING = "responding"  # response head sent to the client
    DONE = "done"


class Exchange:
    """One request/response through the gateway."""

    # Slots: one Exchange per request, so creating and reading it stays cheap.
    __slots__ = (
        "_done",
        "_outcome",
        "_settled",
        "body",
        "body_bytes",
        "body_complete",
        "buffered",
        "chunked",
        "client",
        "client_request_id",
        "cluster_name",
        "conn",
        "content_length",
        "discarding",
        "error",
        "expect_continue",
        "flight",
        "framing",
        "head_only",
        "headers",
        "host",
        "http10",
        "keep_alive",
        "max_body",
        "method",
        "request_id",
        "request_sent",
        "response_bytes",
        "response_started",
        "retry_allowed",
        "route_name",
        "sent",
        "sent_bytes",
        "started",
        "state",
        "status",
        "tries",
        "tunnel",
        "upgrade",
        "upstream_addr",
        "upstream_status",
        "upstream_time",
        "url",
        "user_agent",
    )

    def __init__(
        self,
        client: ClientProtocol,
        method: bytes,
        url: bytes,
        request_id: bytes,
        headers: list[tuple[bytes, bytes]],
        started: float,
    ) -> None:
        self.client = client
        self.method = method
        self.head_only = method == b"HEAD"
        self.url = url
        self.request_id = request_id
        self.client_request_id = False  # request_id came from the client (not made here)
        self.headers = headers
        self.host = b""
        self.http10 = False
        self.keep_alive = True
        self.chunked = False
        self.content_length: int | None = None
        self.expect_continue = False
        self.upgrade: bytes | None = None
        self.user_agent = b""
        self.error: GatewayError | None = None
        self.state = ExchangeState.QUEUED
        self.started = started  # on the loop's clock, as upstream_time
        # Request body: received but not yet sent upstream (made on first
        # use: most requests have none), and a copy of what was sent to the
        # current upstream (None once past the retry buffer).
        self.body: deque[bytes] | None = None
        # Client bytes after an upgrade request, held until 101 (made on first use).
        self.tunnel: list[bytes] | None = None
        self.buffered = 0
        self.body_bytes = 0
        self.body_complete = False
        self.sent: list[bytes] | None = []
        self.sent_bytes = 0
        self.max_body: int | None = None
        self.conn: UpstreamConnection | None = None
        self.retry_allowed = False
        self.request_sent = False  # the current attempt wrote its request head upstream
        self.discarding = False
        self.framing = "length"
        self.response_started = False
        self.response_bytes = 0
        self.status = 0
        self.upstream_status = 0
        self.upstream_addr = ""
        self.upstream_time = 0.0
        self.tries = 0
        self.route_name = ""
        self.cluster_name = ""
        # Each attempt settles once: with the upstream status when the response is
        # complete, or with the error that ended it. The outcome goes to the
        # proxy's task-free fast path when ``flight`` is set (the first attempt
        # it started), else to the future ``wait()`` hands out, created only
        # when someone awaits.
        self.flight: _InFlight | None = None
        self._settled = True
        self._outcome: int | BaseException = 0
        self._done: asyncio.Future[int] | None = None

    def __repr__(self) -> str:
        return (
            f"<Exchange {self.method.decode()} {self.url[:60].decode(errors='replace')} "
            f"{self.state.value} status={self.status} tries={self.tries}>"
        )

    @property
    def replayable(self) -> bool:
        return self.sent is not None

    # -- request body from the client --------------------------------------

    def feed_body(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.state is ExchangeState.DONE:
            return  # answered already: the rest is dropped (see ClientProtocol._finish)
        if self.max_body is not None and self.body_bytes > self.max_body:
            limits_mod.check_body_size(self.body_bytes, self.max_body)
        if self.conn is not None and not self.discarding:
            self._send_body(data)
        elif not self.response_started:
            if self.body is None:
                self.body = deque()
            self.body.append(data)
            self.buffered += len(data)
            if self.buffered > self.client.high_water:
                self.client.pause_reading("buffer")

    def body_done(self, now: float) -> None:
        self.body_complete = True
        if self.conn is not None and not self.discarding:
            if self.chunked:
                self.conn.write(LAST_CHUNK)
            self.conn.request_sent(now)

    def _send_body(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.write(chunk(data) if self.chunked else data)
        if self.sent is not None:
            self.sent_bytes += len(data)
            if self.sent_bytes > self.client.ctx.config.retry_buffer_bytes:
                self.sent = None
            else:
                self.sent.append(data)

    def attach(
        self, conn: UpstreamConnection, head: bytes, read: float, send: float, now: float
    ) -> None:
        """Start one attempt on ``conn``: head, then the body buffered so far."""
        self._settled = False
        self._done = None
        self.discarding = False
        self.request_sent = True
        self.conn = conn
        sent = self.sent
        if sent is None:
            self.sent = []
        elif sent:
            # A retry: what the previous upstream got is sent again first.
            if self.body is None:
                self.body = deque()
            self.body.extendleft(reversed(sent))
            self.buffered += self.sent_bytes
            sent.clear()
        self.sent_bytes = 0
        conn.begin(self, head, head_only=self.head_only, read=read, send=send, now=now)
        body = self.body
        while body:
            self._send_body(body.popleft())
        self.buffered = 0
        self.client.resume_reading("buffer")
        if self.body_complete:
            if self.chunked:
                conn.write(LAST_CHUNK)
            conn.request_sent(now)
        if self.client.write_paused:
            conn.pause_reading()

    def detach(self) -> None:
        self.conn = None
        self.client.resume_reading("upstream")

    # -- sink of the upstream connection: its callbacks ---------------------

    def on_response_head(self, conn: UpstreamConnection) -> None:
        status = conn.status
        self.upstream_status = status
        if self.retry_allowed and should_retry(
            error=False,
            status=status,
            method=self.method,
            replayable=self.replayable,
            response_started=self.response_started,
        ):
            # Swallow this response; the retry loop tries the next server.
            self.discarding = True
        elif conn.codings and self.http10:
            # RFC 9112 6.1: no Transfer-Encoding to an HTTP/1.0 client, and the
            # body cannot go without it (it is still gzip-coded, say).
            codings = conn.codings.decode("latin-1")
            conn.fail(
                UpstreamProtocolError(
                    f"upstream {conn.key} sent Transfer-Encoding {codings!r}, which an"
                    " HTTP/1.0 client cannot receive"
                )
            )
        else:
            self._start_response(conn)

    def _start_response(self, conn: UpstreamConnection) -> None:
        status = conn.status
        client = self.client
        upgrade: bytes | None = None
        if status == 101 and self.upgrade is not None:
            upgrade = self.upgrade
            for name, value in conn.headers:
                if name.lower() == b"upgrade":
                    upgrade = value
            framing = "none"
            if self.tunnel is not None:
                for data in self.tunnel:
                    conn.write(data)
                self.tunnel = None
            self.buffered = 0
            client.resume_reading("buffer")
        elif self.head_only or status in (204, 304):
            framing = "none"
        elif conn.has_length:
            framing = "length"
        elif not self.http10:
            framing = "chunked"
        else:
            framing = "close"
        if (
            framing == "close"
            or client.closes_after_current()
            or (self.upgrade is not None and upgrade is None)
        ):
            self.keep_alive = False
        self.framing = framing
        self.status = status
        self.state = ExchangeState.RESPONDING
        self.response_started = True
        client.write(
            client_response_head(
                status,
                conn.reason,
                conn.headers,
                framing=framing,
                keep_alive=self.keep_alive,
                request_id=self.request_id,
                upgrade=upgrade,
                http10=self.http10,
                codings=conn.codings,
            )
        )

    def on_response_body(self, data: bytes) -> None:
        if self.discarding:
            return
        self.response_bytes += len(data)
        self.client.write(chunk(data) if self.framing == "chunked" else data)

    def on_upgraded_data(self, data: bytes) -> None:
        self.response_bytes += len(data)
        self.client.write(data)

    def on_response_complete(self, conn: UpstreamConnection) -> None:
        if self.framing == "chunked" and not self.discarding:
            self.client.write(LAST_CHUNK)
        self.conn = None
        if self.upstream_status:
            self._settle(self.upstream_status)
        else:
            self._settle(UpstreamClosed("upstream ended without a response"))

    def on_upstream_error(self, conn: UpstreamConnection, exc: UpstreamError) -> None:
        self.conn = None
        self._settle(exc)

    def _settle(self, outcome: int | BaseException) -> None:
        if self._settled:
            return
        self._settled = True
        self._outcome = outcome
        flight, self.flight = self.flight, None
        if flight is not None:
            self.client.fast_attempt_done(self, flight, outcome)
        elif self._done is not None:
            _resolve(self._done, outcome)

    def cork(self) -> None:
        self.client.cork()

    def uncork(self) -> None:
        self.client.uncork()

    def pause_request_body(self) -> None:
        self.client.pause_reading("upstream")

    def resume_request_body(self) -> None:
        self.client.resume_reading("upstream")

    def client_gone(self) -> None:
        self._settle(ClientGone("client closed the connection"))
        if self._done is not None and self._done.done() and not self._done.cancelled():
            self._done.exception()  # retrieved: nobody may be awaiting it any more
        if self.conn is not None:
            self.conn.abort()
            self.conn = None

    def wait(self) -> asyncio.Future[int]:
        """The current attempt's outcome as a future (already done if it is settled)."""
        if self._done is None:
            self._done = self.client.loop.create_future()
            if self._settled:
                _resolve(self._done, self._outcome)
        return self._done


def _resolve(fut: asyncio.Future[int], outcome: int | BaseException) -> None:
    if fut.done():
        return
    if isinstance(outcome, BaseException):
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


class ClientBodyFailed(UpstreamError):
    """The attempt ended because the client's body was invalid, not the upstream."""

    def __init__(self, cause: GatewayError) -> None:
        super().__init__(cause.message)
        self.status = cause.status
        self.code = cause.code
        self.cause = cause
