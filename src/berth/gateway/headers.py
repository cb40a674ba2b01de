"""Header rewriting between client and upstream (pure functions, unit-tested).

Hop-by-hop headers (RFC 9110 7.6.1) and every header named in ``Connection``
describe one connection and must not cross the proxy; framing headers are
rebuilt for each side because the two sides may frame bodies differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Rebuilt by the gateway on the upstream request.
_REQUEST_REPLACED: Final = HOP_BY_HOP | {
    b"content-length",
    b"expect",
    b"host",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
}


def name_lengths(names: Iterable[bytes]) -> int:
    """One bit per length among ``names``, for ``may_be``."""
    mask = 0
    for name in names:
        mask |= 1 << len(name)
    return mask


def may_be(name: bytes, lengths: int) -> bool:
    """Whether header ``name`` may be one of the names ``lengths`` was made
    of (``name_lengths``), told before the name is lowered. Compiled
    (setup.py) the test is two integer operations, where lower() is a method
    call and a new bytes object, and most headers fail it."""
    return bool((lengths >> len(name)) & 1)


# Connection options that name no header.
_OPTIONS: Final = frozenset({b"", b"close", b"keep-alive"})
# Whole Connection values naming no header, as they usually come.
_PLAIN: Final = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
_NO_NAMES: Final[frozenset[bytes]] = frozenset()
_REQUEST_REPLACED_LENGTHS: Final = name_lengths(_REQUEST_REPLACED)
_RESPONSE_SPECIAL_LENGTHS: Final = name_lengths(HOP_BY_HOP | {b"x-request-id"})


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Lower-cased header names listed in Connection (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens |= _named(value)
    return tokens


def _named(connection: bytes) -> frozenset[bytes]:
    """The header names one Connection value lists ("keep-alive" and "close" name none)."""
    if connection in _PLAIN:
        return _NO_NAMES
    return frozenset(t.strip().lower() for t in connection.split(b",")) - _OPTIONS


def _without(headers: list[tuple[bytes, bytes]], names: set[bytes]) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in headers if n.lower() not in names]


def upstream_request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    host: bytes,
    client_ip: str,
    request_id: bytes,
    body: str,
    upgrade: bytes | None,
) -> bytes:
    """The request head sent upstream (always HTTP/1.1, keep-alive).

    ``body`` is "none", "chunked" or the Content-Length as text.
    """
    forwarded_for = b""
    lines = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    # One pass (this runs for every request); a Connection header that names
    # other headers, which is rare, takes a second pass without them.
    for name, value in headers:
        lname = name.lower() if may_be(name, _REQUEST_REPLACED_LENGTHS) else b""
        if lname and lname in _REQUEST_REPLACED:
            if lname == b"x-forwarded-for":
                forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
            elif lname == b"connection" and _named(value):
                named = connection_tokens(headers)
                return upstream_request_head(
                    method, target, _without(headers, named | {b"connection"}), host=host,
                    client_ip=client_ip, request_id=request_id, body=body, upgrade=upgrade,
                )  # fmt: skip
            continue
        # Four appends, not `+= (name, b": ", value, b"\r\n")`: compiled
        # (setup.py), that builds a tuple for every header.
        lines.append(name)
        lines.append(b": ")
        lines.append(value)
        lines.append(b"\r\n")
    ip = client_ip.encode()
    forwarded_for = forwarded_for + b", " + ip if forwarded_for else ip
    lines += (
        b"X-Forwarded-For: ", forwarded_for,
        b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: ", host,
        b"\r\nX-Request-Id: ", request_id, b"\r\n",
    )  # fmt: skip
    if upgrade is not None:
        lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")
    if body == "chunked":
        lines.append(b"Transfer-Encoding: chunked\r\n")
    elif body != "none":
        lines += (b"Content-Length: ", body.encode(), b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def client_response_head(
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    framing: str,
    keep_alive: bool,
    request_id: bytes,
    upgrade: bytes | None = None,
    http10: bool = False,
    codings: bytes = b"",
) -> bytes:
    """The response head sent to the client.

    ``framing`` is "length" (the upstream's Content-Length is kept), "chunked"
    (re-chunked by the gateway), "close" (body ends with the connection) or
    "none" (HEAD, 204, 304: headers passed as they are). ``codings``: transfer
    codings other than chunked the body still carries (``gzip``), which the
    client must be told of. An HTTP/1.0 client keeps its connection only when
    told so (``Connection: keep-alive``).
    """
    has_id = False
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or b"-")]
    for name, value in headers:
        lname = name.lower() if may_be(name, _RESPONSE_SPECIAL_LENGTHS) else b""
        if lname and lname in HOP_BY_HOP:
            if lname == b"connection" and _named(value):
                # Rare: a second pass without the headers Connection names.
                named = connection_tokens(headers)
                return client_response_head(
                    status, reason, _without(headers, named | {b"connection"}),
                    framing=framing, keep_alive=keep_alive, request_id=request_id,
                    upgrade=upgrade, http10=http10, codings=codings,
                )  # fmt: skip
            continue
        if lname == b"x-request-id":
            has_id = True
        # Four appends, not `+= (name, b": ", value, b"\r\n")`: compiled
        # (setup.py), that builds a tuple for every header.
        lines.append(name)
        lines.append(b": ")
        lines.append(value)
        lines.append(b"\r\n")
    if not has_id:
        lines += (b"X-Request-Id: ", request_id, b"\r\n")
    if upgrade is not None:
        lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n\r\n")
        return b"".join(lines)
    if framing == "chunked":
        if codings:
            lines += (b"Transfer-Encoding: ", codings, b", chunked\r\n")
        else:
            lines.append(b"Transfer-Encoding: chunked\r\n")
    if not keep_alive or framing == "close":
        lines.append(b"Connection: close\r\n")
    elif http10:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK: Final = b"0\r\n\r\n"
