"""Bodies through the gateway: chunked both ways, 100-continue, large bodies, WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json

import httpx
import psutil
import pytest
import websockets

from berth.gateway.routes import Route
from tests.gateway.conftest import RawUpstream, read_response


async def _gw(make_gateway, upstreams, **config):
    a = await upstreams("a")
    gw = await make_gateway(**config)
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    return gw, a


async def test_chunked_request_and_response(make_gateway, upstreams) -> None:
    gw, _ = await _gw(make_gateway, upstreams)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    )
    status, headers, body = await read_response(reader)
    assert status == 200
    doc = json.loads(body)
    assert doc["body_size"] == 11
    assert doc["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert doc["headers"]["transfer-encoding"] == "chunked"
    # An upstream response without Content-Length is re-chunked to the client.
    writer.write(b"GET /chunks/5 HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert headers["transfer-encoding"] == "chunked"
    assert body == b"".join(f"chunk-{i};".encode() for i in range(5))
    writer.close()


async def test_http10_client_gets_close_delimited_body(make_gateway, upstreams) -> None:
    gw, _ = await _gw(make_gateway, upstreams)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /chunks/3 HTTP/1.0\r\nHost: svc\r\n\r\n")
    data = await reader.read(-1)
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert b"Connection: close" in head
    assert body == b"chunk-0;chunk-1;chunk-2;"
    writer.close()


async def test_expect_100_continue(make_gateway, upstreams) -> None:
    gw, _ = await _gw(make_gateway, upstreams)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"PUT /f HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    status, _, _ = await read_response(reader)
    assert status == 100
    writer.write(b"data")
    status, _, body = await read_response(reader)
    assert status == 200
    doc = json.loads(body)
    assert doc["body_size"] == 4 and "expect" not in doc["headers"]
    writer.close()


async def test_expect_100_continue_rejected_early(make_gateway, upstreams) -> None:
    gw, _ = await _gw(make_gateway, upstreams)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    # 404 before any body is sent: no 100, the error, and the connection closes.
    writer.write(
        b"PUT /f HTTP/1.1\r\nHost: nobody\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    status, headers, _ = await read_response(reader)
    assert status == 404 and headers["connection"] == "close"
    assert await reader.read(-1) == b""
    writer.close()


async def test_download_and_upload_with_httpx(make_gateway, upstreams) -> None:
    gw, _ = await _gw(make_gateway, upstreams)
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        r = await client.get("/bytes/3000000")
        assert r.status_code == 200 and len(r.content) == 3_000_000
        payload = bytes(range(256)) * 8000
        r = await client.post("/echo", content=payload)
        assert r.content == payload
        r = await client.head("/bytes/1000")
        assert r.status_code == 200 and r.content == b""
        assert r.headers["content-length"] == "1000"
        # The connection is still usable after a HEAD whose headers announce a body.
        r = await client.get("/x")
        assert r.json()["path"] == "/x"


@pytest.mark.slow
async def test_100mb_body_streams_with_bounded_memory(make_gateway, upstreams) -> None:
    gw, _ = await _gw(make_gateway, upstreams)
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    block = b"z" * (1 << 20)
    digest = hashlib.sha256()

    async def body():
        for _ in range(100):
            digest.update(block)
            yield block

    peak = 0
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}, timeout=60) as client:
        r = await client.put("/upload", content=body())
        assert r.status_code == 200
        doc = r.json()
        assert doc["body_size"] == 100 << 20
        assert doc["body_sha256"] == digest.hexdigest()
        peak = max(peak, proc.memory_info().rss - before)
        # And down: 100 MB from the upstream, read as a stream.
        got = 0
        async with client.stream("GET", "/bytes/104857600") as resp:
            async for data in resp.aiter_raw():
                got += len(data)
                peak = max(peak, proc.memory_info().rss - before)
        assert got == 100 << 20
    # Client, gateway and upstream share this process: all of them together
    # stay far below the 100 MB that buffering one body would cost.
    assert peak < 40 << 20, f"RSS grew by {peak >> 20} MiB"


async def test_slow_client_reading_pauses_upstream(make_gateway, upstreams) -> None:
    gw, _ = await _gw(make_gateway, upstreams, buffer_high_water=65536)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port, limit=65536)
    writer.transport.set_write_buffer_limits(0)
    writer.write(b"GET /bytes/30000000 HTTP/1.1\r\nHost: svc\r\n\r\n")
    # Read nothing for a moment: the gateway must stop reading from the upstream
    # instead of buffering the body.
    await asyncio.sleep(0.5)
    ctx = gw.server.ctx
    assert ctx is not None
    (conn,) = ctx.connections
    assert conn.write_paused
    assert conn.transport.get_write_buffer_size() < 8 << 20
    status, _, body = await read_response(reader)
    assert status == 200 and len(body) == 30_000_000
    writer.close()


async def test_websocket_passthrough(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set([Route("127.0.0.1", "/", "svc")], {"svc": [("127.0.0.1", a.port)]})
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws") as ws:
        await ws.send("hi")
        assert await ws.recv() == "a:hi"
        await ws.send(b"\x00\x01" * 50000)
        assert await ws.recv() == b"\x00\x01" * 50000


async def test_declined_upgrade_smuggles_nothing_to_the_upstream(make_gateway) -> None:
    # Bytes after an upgrade request belong to the new protocol only if the
    # upstream switches; if it answers 200 they would be parsed as a second
    # request on a pooled connection (request smuggling, response desync).
    paths: list[bytes] = []

    async def declines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            path = (await reader.readuntil(b"\r\n\r\n")).split(b" ")[1]
            paths.append(path)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path))
            await writer.drain()

    up = await RawUpstream(declines).start()
    try:
        gw = await make_gateway()
        gw.routes.set([Route("svc", "/", "c", tries=1)], {"c": [("127.0.0.1", up.port)]})
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"
        )
        status, headers, body = await read_response(reader)
        assert (status, body) == (200, b"/ws") and headers["connection"] == "close"
        writer.close()
        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
            for path in ("/a", "/b"):
                assert (await client.get(path)).content == path.encode()
        assert paths == [b"/ws", b"/a", b"/b"]
    finally:
        await up.stop()


async def test_post_with_empty_body_keeps_content_length(make_gateway, upstreams) -> None:
    # Many servers answer 411 to a POST without framing headers.
    gw, _ = await _gw(make_gateway, upstreams)
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        r = await client.post("/p", content=b"")
    assert r.status_code == 200 and r.json()["headers"].get("content-length") == "0"


async def test_http10_expect_is_ignored(make_gateway, upstreams) -> None:
    # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is
    # ignored; HTTP/1.0 clients do not know interim responses.
    gw, a = await _gw(make_gateway, upstreams)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"PUT /f HTTP/1.0\r\nHost: svc\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    await a.app.arrived.wait()
    writer.write(b"data")
    data = await reader.read(-1)
    assert data.startswith(b"HTTP/1.1 200 ")
    assert json.loads(data.partition(b"\r\n\r\n")[2])["body_size"] == 4
    writer.close()


async def test_http10_keep_alive_is_confirmed_and_kept(make_gateway, upstreams) -> None:
    # An HTTP/1.0 client keeps its connection only when the response says so.
    gw, _ = await _gw(make_gateway, upstreams)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        for path, host in ((b"/one", b"svc"), (b"/two", b"nowhere.test"), (b"/three", b"svc")):
            writer.write(
                b"GET "
                + path
                + b" HTTP/1.0\r\nHost: "
                + host
                + b"\r\nConnection: keep-alive\r\n\r\n"
            )
            status, headers, body = await read_response(reader)
            assert status == (404 if host == b"nowhere.test" else 200)
            assert headers["connection"] == "keep-alive"
            assert "content-length" in headers and "transfer-encoding" not in headers
            if status == 200:
                assert json.loads(body)["path"] == path.decode()
    finally:
        writer.close()


async def _gzip_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"4\r\nGZ01\r\n3\r\nGZ2\r\n0\r\n\r\n"
        )
        await writer.drain()


async def test_transfer_codings_besides_chunked_reach_the_client(make_gateway) -> None:
    up = await RawUpstream(_gzip_chunked).start()
    try:
        gw = await make_gateway()
        gw.routes.set([], {"svc": [("127.0.0.1", up.port)]})
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        # The body is still gzip-coded: the client is told, with the chunking redone.
        assert "transfer-encoding: gzip, chunked\r\n" in head
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        assert b"".join(parts) == b"GZ01GZ2"
        await reader.readexactly(2)
        # HTTP/1.0 knows no Transfer-Encoding: such a body cannot be passed on.
        writer.write(b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 502 and "HTTP/1.0" in json.loads(body)["error"]
        writer.close()
    finally:
        await up.stop()


async def _answer_before_the_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    # Answers as soon as the head is in, never reading the body (an auth check).
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\ndenied")
    await writer.drain()
    await reader.read()


async def test_unread_body_is_dropped_and_the_connection_kept(make_gateway, upstreams) -> None:
    # As nginx's discard_request_body: a response that did not need the rest of
    # the body leaves the connection usable once that rest has been read.
    early = await RawUpstream(_answer_before_the_body).start()
    a = await upstreams("a")
    try:
        gw = await make_gateway()
        gw.routes.set(
            [Route("early", "/", "early")],
            {"early": [("127.0.0.1", early.port)], "svc": [("127.0.0.1", a.port)]},
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"PUT /x HTTP/1.1\r\nHost: early\r\nContent-Length: 100000\r\n\r\n" + b"a" * 10
        )
        status, headers, body = await read_response(reader)
        assert (status, body) == (401, b"denied") and "connection" not in headers
        writer.write(b"a" * 99_990)
        # An unknown host with a small body: 404, and the connection stays too.
        writer.write(b"POST / HTTP/1.1\r\nHost: nowhere.test\r\nContent-Length: 3\r\n\r\nabc")
        status, headers, _ = await read_response(reader)
        assert status == 404 and "connection" not in headers
        writer.write(b"GET /after HTTP/1.1\r\nHost: svc\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and json.loads(body)["path"] == "/after"
        # Too much left to be worth reading: the connection closes after the answer
        # (whose head went out before the gateway knew the upstream would not read on).
        writer.write(b"PUT /x HTTP/1.1\r\nHost: early\r\nContent-Length: 50000000\r\n\r\nabc")
        status, headers, _ = await read_response(reader)
        assert status == 401
        assert await reader.read() == b""
        writer.close()
        # A chunked body is dropped up to a budget, then the connection closes.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"PUT /x HTTP/1.1\r\nHost: early\r\nTransfer-Encoding: chunked\r\n\r\n")
        status, _, _ = await read_response(reader)
        assert status == 401
        piece = b"10000\r\n" + b"c" * 0x10000 + b"\r\n"
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # 2.5 MiB, over the 1 MiB budget
                writer.write(piece)
                await writer.drain()
        assert await reader.read() == b""
        writer.close()
    finally:
        await early.stop()
