"""uvicorn's httptools protocol with a bound on the request head, in size and time.

httptools keeps every byte of a request line and headers until the head ends,
without limit: one client sending endless headers grew the service by as much
as it sent (300 MB of headers, 300 MB of memory). h11 has such a limit but
costs several times more per request, so the bound is added here, and the
answer is the one h11 and nginx give: 431. uvicorn also has no timer on a
head, so a connection that sends half a head, or nothing, stayed open for ever.
These answers, and the 400 for a request the parser cannot read, never reach
the application: the protocol reports them through ``on_refusal`` so that
/metrics counts every response, not only the application's.

It also reads a large upload straight into its final buffer (``WHOLE_BODY``).
uvicorn hands a body over in 64 KiB steps, and each byte is copied four times
on the way (event loop buffer -> bytes -> parser's bytes -> the cycle's
bytearray -> bytes per message) before the application joins the pieces: a
4 MB upload cost the service 2.9 ms of CPU, a third of it memcpy, beside a
thumbnail whose processing takes ~50 ms (now under 2 ms: the kernel's copy
and zeroing the new buffer). With a ``BufferedProtocol`` in place for the rest
of the body, the kernel writes the bytes into one buffer of Content-Length and
nothing else touches them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

MAX_HEAD_BYTES = 64 * 1024
# The ASGI scope extension of a request whose body can be read whole: an async
# callable returning the body as one bytearray, or None if the client left.
# Only before any receive(), and only once.
WHOLE_BODY = "berth.whole_body"
# Smaller bodies arrive in one or two reads anyway; the usual path costs as little.
WHOLE_BODY_MIN_BYTES = 256 * 1024

WholeBody = Callable[[], Awaitable[bytearray | None]]


def _response(status: bytes, code: str, message: str) -> bytes:
    body = json.dumps({"error": code, "message": message}).encode()
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


_TOO_LARGE = _response(
    b"431 Request Header Fields Too Large",
    "headers_too_large",
    f"request head is over {MAX_HEAD_BYTES} bytes",
)
_TIMEOUT = _response(b"408 Request Timeout", "head_timeout", "request head did not arrive in time")

Refusal = Callable[[int, str], None]  # (status, error code) of a response sent here


class BodySink(asyncio.BufferedProtocol):
    """The transport's protocol while the rest of one request body arrives.

    Reads land in ``buffer`` directly, never past its end, so the bytes of a
    pipelined next request stay in the socket for the HTTP protocol. Everything
    that is not a read goes to the HTTP protocol it stands in for.
    """

    def __init__(self, owner: BoundedHeadProtocol, buffer: bytearray, filled: int) -> None:
        self.owner = owner
        self.buffer = buffer
        self.filled = filled
        self.view = memoryview(buffer)
        self.done: asyncio.Future[bytearray | None] = owner.loop.create_future()
        # After a timeout the rest of the body is read and dropped, not parsed as a
        # request, until the connection closes behind the answer.
        self.discarding = False

    def __repr__(self) -> str:
        state = "discarding" if self.discarding else f"{self.filled}/{len(self.buffer)}"
        return f"<BodySink {state}>"

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view if self.discarding else self.view[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.discarding:
            return
        self.filled += nbytes
        if self.filled == len(self.buffer):
            self.owner.body_filled(self)

    def eof_received(self) -> bool | None:
        return None  # the transport closes, and connection_lost tells the owner

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


class BoundedHeadProtocol(HttpToolsProtocol):
    # Set per server by bounded_head_protocol().
    head_timeout: float = 60.0
    on_refusal: Refusal | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True from the end of one message until the next one's headers are complete.
        self._in_head = True
        self._head_ended = False
        self._head_bytes = 0
        self._message_begun = False
        self._head_timer: asyncio.TimerHandle | None = None
        # Body bytes of the current message the parser has passed on.
        self._body_seen = 0
        self._sink: BodySink | None = None

    def __repr__(self) -> str:
        state = "head" if self._in_head else "body"
        sink = f" sink={self._sink!r}" if self._sink is not None else ""
        return f"<BoundedHeadProtocol {state} head_bytes={self._head_bytes}{sink}>"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        sink, self._sink = self._sink, None
        if sink is not None and not sink.done.done():
            sink.done.set_result(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        started_in_head = self._in_head
        self._head_ended = False
        super().data_received(data)
        # Only a chunk that began in a head and saw no head end is all head bytes; one
        # that starts a pipelined request is skipped, so the bound is off by one read.
        if not started_in_head or self._head_ended or self.transport.is_closing():
            return
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._refuse(_TOO_LARGE, 431, "headers_too_large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._message_begun = True
        self._head_bytes = 0
        self._body_seen = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_ended = True
        self._cancel_head_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None or cycle.scope is not self.scope:
            return  # an upgrade: no request cycle
        length = whole_body_length(self.headers)
        if length is not None:
            extensions = cast(dict[str, Any], self.scope.setdefault("extensions", {}))
            extensions[WHOLE_BODY] = self._whole_body_reader(cycle, length)

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._message_begun = False
        self._head_bytes = 0

    def _whole_body_reader(self, cycle: RequestResponseCycle, length: int) -> WholeBody:
        async def read() -> bytearray | None:
            if cycle.disconnected or self.transport.is_closing():
                return None
            if cycle.waiting_for_100_continue:
                # What uvicorn's receive() does on the first call.
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                cycle.waiting_for_100_continue = False
            if not cycle.more_body:  # the parser has passed on all of it already
                body, cycle.body = cycle.body, bytearray()
                return body
            if cycle is not self.cycle or len(cycle.body) != self._body_seen:
                raise RuntimeError("the whole body is read once, before any receive()")
            buffer = bytearray(length)
            buffer[: len(cycle.body)] = cycle.body
            cycle.body = bytearray()
            sink = BodySink(self, buffer, self._body_seen)
            self._sink = sink
            self.transport.set_protocol(sink)
            self.flow.resume_reading()
            try:
                return await sink.done
            except asyncio.CancelledError:
                # A body timeout: the answer goes out, then the connection closes;
                # the bytes still coming are the body's, not a next request.
                sink.discarding = True
                cycle.keep_alive = False
                raise

        return read

    def body_filled(self, sink: BodySink) -> None:
        """The sink has the whole body: the HTTP protocol reads the connection again."""
        self._sink = None
        self.transport.set_protocol(self)
        # The parser never saw the sink's bytes and still waits for them; a new
        # parser starts at the next request, as this one would have.
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self._body_seen = len(sink.buffer)
        self.on_message_complete()
        sink.done.set_result(sink.buffer)

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head waits behind a request still being answered; the 408
            # must not overtake that response.
            self._arm_head_timer()
            return
        if self._message_begun:
            self._refuse(_TIMEOUT, 408, "head_timeout")
        else:
            self.transport.close()  # nothing was asked, so nothing is answered

    def send_400_response(self, msg: str) -> None:
        # uvicorn's own 400 (the parser gave up) is text/plain; every error here is JSON.
        response = _response(b"400 Bad Request", "malformed_request", msg)
        self._refuse(response, 400, "malformed_request")

    def _refuse(self, response: bytes, status: int, code: str) -> None:
        self._cancel_head_timer()
        self.transport.write(response)
        self.transport.close()
        if self.on_refusal is not None:
            self.on_refusal(status, code)


def whole_body_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length of a body worth reading whole, else None (chunked, small)."""
    length = None
    for name, value in headers:  # names are lower case already
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if length is not None or not value.isdigit():
                return None  # the parser refuses these; nothing to read
            length = int(value)
    return length if length is not None and length >= WHOLE_BODY_MIN_BYTES else None


def bounded_head_protocol(
    head_timeout: float, on_refusal: Refusal | None = None
) -> type[BoundedHeadProtocol]:
    """The protocol class for one server (uvicorn builds it without our config)."""
    # staticmethod: a plain function stored on a class would be bound to each protocol.
    attributes: dict[str, Any] = {"head_timeout": head_timeout}
    if on_refusal is not None:
        attributes["on_refusal"] = staticmethod(on_refusal)
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), attributes)
