"""Proxying through a real gateway to real upstream servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

import httpx

from berth.gateway.routes import Route, Timeouts
from tests.gateway.conftest import eventually, read_response


async def test_routes_by_host_and_passes_headers(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    b = await upstreams("b")
    gw = await make_gateway()
    gw.routes.set(
        [Route("img.example.com", "/", "ca"), Route("*.example.com", "/", "cb")],
        {"ca": [("127.0.0.1", a.port)], "cb": [("127.0.0.1", b.port)]},
    )
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.get("/x?q=1", headers={"Host": "IMG.example.com:3130"})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["upstream"] == "a"
        assert doc["path"] == "/x" and doc["query"] == "q=1"
        h = doc["headers"]
        assert h["host"] == "IMG.example.com:3130"
        assert h["x-forwarded-for"] == "127.0.0.1"
        assert h["x-forwarded-proto"] == "http"
        assert h["x-forwarded-host"] == "IMG.example.com:3130"
        assert r.headers["x-request-id"] == h["x-request-id"]
        r = await client.get("/", headers={"Host": "other.example.com"})
        assert r.json()["upstream"] == "b"
        # The cluster's own name routes to it without a route (Slardar's rule).
        r = await client.get("/", headers={"Host": "ca"})
        assert r.json()["upstream"] == "a"
        r = await client.get("/", headers={"Host": "nobody.test", "X-Request-Id": "abc-1"})
        assert r.status_code == 404
        assert r.json() == {
            "error": "no route for host 'nobody.test'",
            "status": 404,
            "host": "nobody.test",
            "request_id": "abc-1",
        }


async def test_absolute_form_target_routes_by_its_authority(make_gateway, upstreams) -> None:
    # RFC 9112 3.2.2: a request target in absolute form overrides Host; an
    # absent port, path or query must not fail (the parser gives None for them).
    a = await upstreams("a")
    b = await upstreams("b")
    gw = await make_gateway()
    gw.routes.set(
        [Route("img.example.com", "/", "ca"), Route("other.example.com", "/", "cb")],
        {"ca": [("127.0.0.1", a.port)], "cb": [("127.0.0.1", b.port)]},
    )
    cases = [
        (b"http://img.example.com/x?q=1", "a", "/x", "q=1", "img.example.com"),
        (b"http://img.example.com:8080/y", "a", "/y", "", "img.example.com:8080"),
        (b"http://img.example.com", "a", "/", "", "img.example.com"),
        (b"http://img.example.com?only=query", "a", "/", "only=query", "img.example.com"),
        (b"https://user@IMG.example.com:443/z", "a", "/z", "", "IMG.example.com:443"),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        for target, upstream, path, query, host in cases:
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
            status, _, body = await read_response(reader)
            assert status == 200, (target, body)
            doc = json.loads(body)
            assert doc["upstream"] == upstream, target
            assert (doc["path"], doc["query"]) == (path, query), target
            assert doc["headers"]["host"] == host, target
        writer.write(b"GET http://svc:99999/ HTTP/1.1\r\nHost: other.example.com\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 400 and json.loads(body)["error"] == "malformed request target"
    finally:
        writer.close()


async def test_hop_by_hop_headers_removed_and_request_id_kept(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.get(
            "/",
            headers={
                "Host": "svc",
                "Connection": "keep-alive, X-Secret",
                "X-Secret": "1",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "X-Forwarded-For": "10.0.0.1",
                "X-Request-Id": "req-42",
            },
        )
    h = r.json()["headers"]
    for name in ("x-secret", "keep-alive", "te"):
        assert name not in h
    assert h["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"
    assert h["x-request-id"] == "req-42"
    assert r.headers["x-request-id"] == "req-42"


async def test_keepalive_and_pipelining_in_order(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    # The first request is slow: the second must still be answered after it.
    writer.write(
        b"GET /sleep/0.2 HTTP/1.1\r\nHost: svc\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: svc\r\n\r\n"
        b"POST /third HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"
    )
    paths = []
    for _ in range(3):
        status, _, body = await read_response(reader)
        assert status == 200
        paths.append(json.loads(body)["path"])
    assert paths == ["/sleep/0.2", "/second", "/third"]
    writer.close()
    # Upstream connections were reused, not one per request.
    assert gw.server.ctx is not None
    assert gw.server.ctx.pool.opened <= 2


async def test_drain_serves_a_request_whose_head_is_still_arriving(make_gateway, upstreams) -> None:
    # Draining closes idle keep-alive connections, but one in the middle of a
    # request head is not idle: closing it loses a request the client sent.
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    ctx = gw.server.ctx
    assert ctx is not None
    r1, w1 = await asyncio.open_connection("127.0.0.1", gw.port)
    w1.write(b"GET /late HTTP/1.1\r\nHost: svc\r\n")
    r2, w2 = await asyncio.open_connection("127.0.0.1", gw.port)
    await eventually(
        lambda: len(ctx.connections) == 2 and any("head=True" in repr(c) for c in ctx.connections)
    )
    stopping = asyncio.create_task(gw.server.stop())
    try:
        assert await r2.read() == b""  # the idle one is closed
        w1.write(b"\r\n")
        status, headers, body = await read_response(r1)
        assert status == 200 and json.loads(body)["path"] == "/late"
        assert headers["connection"] == "close"
    finally:
        w1.close()
        w2.close()
        await stopping


async def test_drain_answers_pipelined_requests_already_read(make_gateway, upstreams) -> None:
    # Requests read behind the one in progress when draining starts are
    # answered too; only the last response closes the connection.
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    a.app.arrived.clear()
    writer.write(
        b"GET /hold HTTP/1.1\r\nHost: svc\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: svc\r\n\r\n"
        b"GET /third HTTP/1.1\r\nHost: svc\r\n\r\n"
    )
    await a.app.arrived.wait()
    ctx = gw.server.ctx
    assert ctx is not None
    await eventually(lambda: any("pipeline=2" in repr(c) for c in ctx.connections))
    stopping = asyncio.create_task(gw.server.stop())
    try:
        await eventually(lambda: ctx.draining)
        a.app.hold.set()
        seen = []
        for _ in range(3):
            status, headers, body = await read_response(reader)
            assert status == 200
            seen.append((json.loads(body)["path"], headers.get("connection")))
        assert seen == [("/hold", None), ("/second", None), ("/third", "close")]
        assert await reader.read() == b""
    finally:
        writer.close()
        await stopping


async def test_stop_awaits_request_tasks_of_aborted_connections(make_gateway, upstreams) -> None:
    # A request on the coroutine path (a route with a total timeout) that
    # outlives the grace period: stop() aborts its connection and returns only
    # once the request task has finished and logged it (499: client gone).
    a = await upstreams("a")
    gw = await make_gateway(shutdown_grace=0.2)
    gw.routes.set(
        [Route("svc", "/", "c", timeouts=Timeouts(total=60))], {"c": [("127.0.0.1", a.port)]}
    )
    ctx = gw.server.ctx
    assert ctx is not None
    _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        a.app.arrived.clear()
        writer.write(b"GET /hold HTTP/1.1\r\nHost: svc\r\n\r\n")
        await a.app.arrived.wait()
        assert len(ctx.tasks) == 1
        closed_before = ctx.metrics.route("svc").statuses.get(499, 0)  # per process
        await gw.server.stop()
        assert not ctx.tasks
        assert ctx.metrics.route("svc").statuses[499] == closed_before + 1
    finally:
        writer.close()
        a.app.hold.set()
