"""Hostile and malformed requests: each gets its status, nothing reaches the upstream,
the connection is closed (not leaked), and the gateway serves the next request."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.gateway.conftest import eventually, raw_request

H = b"Host: svc\r\n"
TLS_HELLO = bytes.fromhex("16030100a5010000a10303") + bytes(range(32)) + b"\x00\x20"

CASES: list[tuple[str, bytes, int]] = [
    ("cl-te", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-cl", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Content-Length: 4\r\n\r\n0\r\n\r\n", 400),
    ("duplicate-cl-differ", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
     b"Content-Length: 4\r\n\r\nabcd", 400),
    ("duplicate-cl-same", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
     b"Content-Length: 3\r\n\r\nabc", 400),
    ("cl-negative", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    ("cl-not-a-number", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: abc\r\n\r\n", 400),
    ("cl-plus", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nabcde", 400),
    ("cl-two-values", b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1, 1\r\n\r\na", 400),
    ("te-chunked-not-last", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("te-unknown", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n", 400),
    ("te-twice", b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("space-before-colon", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("chunk-size-not-hex", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\nabc\r\n", 400),
    ("chunk-missing-crlf", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", 400),
    ("chunk-negative", b"POST / HTTP/1.1\r\n" + H +
     b"Transfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n", 400),
    ("obs-fold", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", 400),
    ("nul-in-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    ("cr-in-header", b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n", 400),
    ("lf-only", b"GET / HTTP/1.1\nHost: svc\n\n", 400),
    ("bad-header-name", b"GET / HTTP/1.1\r\n" + H + b"X A: b\r\n\r\n", 400),
    ("header-without-colon", b"GET / HTTP/1.1\r\n" + H + b"JustAName\r\n\r\n", 400),
    ("no-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("two-hosts", b"GET / HTTP/1.1\r\n" + H + b"Host: other\r\n\r\n", 400),
    ("garbage", b"GARBAGE\r\n\r\n", 400),
    ("tls-on-plain-port", TLS_HELLO, 400),
    ("bad-method", b"G@T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("bad-version", b"GET / HTTP/9.9\r\n" + H + b"\r\n", 400),
    ("nul-in-url", b"GET /\x00 HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("space-in-url", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("huge-uri", b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    ("huge-header", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
    ("unterminated-header", b"GET / HTTP/1.1\r\n" + H + b"X-Big: " + b"b" * 100000, 431),
    ("many-headers", b"GET / HTTP/1.1\r\n" + H + b"".join(
        b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
    ("expect-unknown", b"POST / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\n"
     b"Content-Length: 0\r\n\r\n", 417),
    ("expect-unknown-second", b"POST / HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n"
     b"Expect: 200-ok\r\nContent-Length: 0\r\n\r\n", 417),
    ("connect-method", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
     b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n", 405),
    ("body-after-error", b"GET / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n5\r\nGET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n", 400),
]  # fmt: skip


@pytest.fixture
async def target(make_gateway, upstreams):
    a = await upstreams("a")
    gw = await make_gateway(client_header_timeout=0.5)
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    return gw, a


@pytest.mark.parametrize(("name", "data", "status"), CASES, ids=[c[0] for c in CASES])
async def test_hostile_input(target, name: str, data: bytes, status: int) -> None:
    gw, upstream = target
    response = await raw_request(gw.port, data)
    assert response.startswith(b"HTTP/1.1 %d " % status), response[:200]
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"Connection: close" in head
    doc = json.loads(body)
    assert doc["status"] == status and doc["error"] and doc["request_id"]
    assert upstream.app.requests == [], "a rejected request reached the upstream"
    await _still_serves(gw)


async def test_slowloris_gets_408(target) -> None:
    gw, _ = target
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    for part in (b"GET / HTTP/1.1\r\n", b"Host: svc\r\n", b"X-Slow: 1\r\n"):
        writer.write(part)
        await asyncio.sleep(0.2)
    async with asyncio.timeout(10):
        response = await reader.read(-1)
    assert response.startswith(b"HTTP/1.1 408 ")
    writer.close()
    await _still_serves(gw)


async def test_many_idle_connections_then_normal_traffic(target) -> None:
    gw, _ = target
    conns = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(200)]
    await _still_serves(gw)
    for _, writer in conns:
        writer.close()


async def test_client_vanishing_mid_request_leaks_nothing(target) -> None:
    gw, upstream = target
    for data in (
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000,
        b"GET /hold HTTP/1.1\r\nHost: svc\r\n\r\n",
    ):
        upstream.app.arrived.clear()
        _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(data)
        await writer.drain()
        await upstream.app.arrived.wait()
        writer.transport.abort()
    ctx = gw.server.ctx
    await eventually(lambda: not ctx.connections)
    await _still_serves(gw)


async def _still_serves(gw) -> None:
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        r = await client.get("/after")
        assert r.status_code == 200 and r.json()["path"] == "/after"
