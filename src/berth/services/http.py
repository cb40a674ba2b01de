"""uvicorn's httptools protocol with a bound on the request head.

httptools keeps every byte of a request line and headers until the head ends,
without limit: one client sending endless headers grew the service by as much
as it sent (300 MB of headers, 300 MB of memory). h11 has such a limit but
costs several times more per request, so the bound is added here, and the
answer is the one h11 and nginx give: 431.
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024

_BODY = json.dumps(
    {"error": "headers_too_large", "message": f"request head is over {MAX_HEAD_BYTES} bytes"}
).encode()
_RESPONSE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n"
    b"connection: close\r\n\r\n" + _BODY
)


class BoundedHeadProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True from the end of one message until the next one's headers are complete.
        self._in_head = True
        self._head_ended = False
        self._head_bytes = 0

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
            self.transport.write(_RESPONSE)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_ended = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0
