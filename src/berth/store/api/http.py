"""Request parsing and response sending shared by the /v1 handlers.

Hand-rolled rather than Starlette: the KV read path is the platform's hottest,
and a request object with a once-parsed query and a raw-header response is
all it needs.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.types import Receive, Send

from berth.store.client import parse_duration
from berth.store.errors import BadRequest, MethodNotAllowed, PayloadTooLarge

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    receive: Receive
    content_length: int | None

    def flag(self, name: str) -> bool:
        """Consul's presence-only parameters: ``?recurse=false`` still recurses."""
        return name in self.query

    def param(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    def uint(self, name: str, what: str) -> int | None:
        values = self.query.get(name)
        if not values:
            return None
        try:
            value = int(values[0])
        except ValueError:
            raise BadRequest(f"Invalid {what}: {values[0]!r} is not an unsigned integer") from None
        if value < 0 or value >= 2**64:
            raise BadRequest(f"Invalid {what}: {values[0]!r} is out of range")
        return value

    async def body(self, limit: int, what: str = "Request body") -> bytes:
        """The whole body, refusing (413) anything over ``limit`` bytes without reading it all."""
        if self.content_length is not None and self.content_length > limit:
            raise PayloadTooLarge(
                f"{what}({self.content_length} bytes) too large, max size: {limit} bytes"
            )
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise BadRequest("client disconnected before sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"{what}({size}+ bytes) too large, max size: {limit} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def json(self, limit: int) -> Any:
        raw = await self.body(limit)
        if not raw.strip():
            return None
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"Request decode failed: {exc}") from None


def parse_request(scope: MutableMapping[str, Any], receive: Receive) -> Request:
    qs: bytes = scope.get("query_string", b"")
    query = parse_qs(qs.decode("latin-1"), keep_blank_values=True) if qs else {}
    length: int | None = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise BadRequest("invalid Content-Length") from None
            break
    return Request(scope["method"], scope["path"], query, receive, length)


def wait_param(req: Request, default: float, maximum: float) -> float:
    text = req.param("wait")
    if not text:
        return default
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise BadRequest("Invalid wait time") from None
    return min(seconds, maximum) if seconds > 0 else default


def require_method(req: Request, *allowed: str) -> None:
    if req.method not in allowed:
        raise MethodNotAllowed(f"method {req.method} not allowed")


def check_consistency(req: Request) -> None:
    if "stale" in req.query and "consistent" in req.query:
        raise BadRequest("Cannot specify ?stale with ?consistent, conflicting semantics.")


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    index: int | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if index is not None:
        # Consul sets these on every read; clients such as py-consul require the index.
        headers.append((b"x-consul-index", b"%d" % max(index, 1)))
        headers.append((b"x-consul-knownleader", b"true"))
        headers.append((b"x-consul-lastcontact", b"0"))
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
