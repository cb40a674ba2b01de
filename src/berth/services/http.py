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
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024


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

    def __repr__(self) -> str:
        state = "head" if self._in_head else "body"
        return f"<BoundedHeadProtocol {state} head_bytes={self._head_bytes}>"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
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
        if self._head_timer is None:
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_ended = True
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._message_begun = False
        self._head_bytes = 0

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


def bounded_head_protocol(
    head_timeout: float, on_refusal: Refusal | None = None
) -> type[BoundedHeadProtocol]:
    """The protocol class for one server (uvicorn builds it without our config)."""
    # staticmethod: a plain function stored on a class would be bound to each protocol.
    attributes: dict[str, Any] = {"head_timeout": head_timeout}
    if on_refusal is not None:
        attributes["on_refusal"] = staticmethod(on_refusal)
    return type("BoundedHeadProtocol", (BoundedHeadProtocol,), attributes)
