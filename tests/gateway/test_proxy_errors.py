"""Retries, timeouts and the gateway's own error responses."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest

from berth.gateway.routes import Route, Timeouts
from tests.gateway.conftest import RawUpstream, eventually, read_response


def _dead_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connection refused
    return port


async def _answer_503(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"content-length" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy")
        await writer.drain()


async def test_connect_failure_is_retried_on_the_next_server(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway()
    dead = _dead_port()
    gw.routes.set(
        [Route("svc", "/", "c", tries=2)], {"c": [("127.0.0.1", dead), ("127.0.0.1", a.port)]}
    )
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        for _ in range(4):
            r = await client.get("/")
            assert r.status_code == 200 and r.json()["upstream"] == "a"
    cluster = gw.routes.table.clusters["c"]
    assert cluster.server(f"127.0.0.1:{dead}").fail_num > 0


async def test_every_server_down_gives_502_json(make_gateway) -> None:
    gw = await make_gateway()
    gw.routes.set([Route("svc", "/", "c", tries=3)], {"c": [("127.0.0.1", _dead_port())]})
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        r = await client.get("/")
    assert r.status_code == 502
    doc = r.json()
    assert "cannot connect to upstream" in doc["error"] and doc["request_id"]
    assert r.headers["x-request-id"] == doc["request_id"]


async def test_no_server_gives_503(make_gateway) -> None:
    gw = await make_gateway()
    gw.routes.set([Route("svc", "/", "empty")], {})
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        r = await client.get("/")
    assert r.status_code == 503 and "no server" in r.json()["error"]


async def test_503_retried_for_idempotent_not_for_post(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    busy = await RawUpstream(_answer_503).start()
    try:
        gw = await make_gateway()
        gw.routes.set(
            [Route("svc", "/", "c", tries=2)],
            {"c": [("127.0.0.1", busy.port), ("127.0.0.1", a.port)]},
        )
        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
            results = [(await client.get("/")).status_code for _ in range(4)]
            assert results == [200] * 4
            # PUT with a small body is idempotent and replayable: retried too.
            r = await client.put("/p", content=b"x" * 1000)
            assert r.status_code == 200 and r.json()["body_size"] == 1000
            # POST may have been acted on: the upstream's 503 goes to the client.
            statuses = {(await client.post("/p", content=b"x")).status_code for _ in range(4)}
            assert statuses == {200, 503}
    finally:
        await busy.stop()


async def test_last_try_passes_the_upstream_error_through(make_gateway) -> None:
    busy = await RawUpstream(_answer_503).start()
    try:
        gw = await make_gateway()
        gw.routes.set([Route("svc", "/", "c", tries=2)], {"c": [("127.0.0.1", busy.port)]})
        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
            r = await client.get("/")
        assert r.status_code == 503 and r.content == b"busy"
    finally:
        await busy.stop()


async def test_read_timeout_gives_504_and_next_server(make_gateway, upstreams) -> None:
    slow = await upstreams("slow")
    gw = await make_gateway()
    gw.routes.set(
        [Route("svc", "/", "c", tries=1, timeouts=Timeouts(read=0.2))],
        {"c": [("127.0.0.1", slow.port)]},
    )
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        r = await client.get("/hold")
        assert r.status_code == 504
        assert "sent nothing for 0.2s" in r.json()["error"]
        # The gateway is fine afterwards.
        assert (await client.get("/")).status_code == 200


async def test_total_timeout_gives_504(make_gateway, upstreams) -> None:
    slow = await upstreams("slow")
    gw = await make_gateway()
    gw.routes.set(
        [Route("svc", "/", "c", timeouts=Timeouts(total=0.3))], {"c": [("127.0.0.1", slow.port)]}
    )
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        r = await client.get("/hold")
    assert r.status_code == 504 and "total timeout" in r.json()["error"]


async def test_stale_pooled_connection_is_resent_transparently(make_gateway) -> None:
    # Answers one request per connection but (wrongly) announces keep-alive,
    # like a server whose idle timeout just fired: the pooled connection is dead.
    async def one_shot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    up = await RawUpstream(one_shot).start()
    try:
        gw = await make_gateway()
        gw.routes.set([Route("svc", "/", "c", tries=1)], {"c": [("127.0.0.1", up.port)]})
        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
            for _ in range(5):
                r = await client.post("/", content=b"body")
                assert r.status_code == 200 and r.content == b"ok"
    finally:
        await up.stop()


async def _garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"SPDY/9 lol\r\n\r\n")
    await writer.drain()


async def _endless_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for n in range(2000):  # 2000 headers of 50 bytes: over the 64 KiB limit
        writer.write(b"X-%05d: %s\r\n" % (n, b"v" * 40))
        await writer.drain()
    await reader.read()  # until the gateway hangs up


async def _endless_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
    for _ in range(100):  # one header line of 100 KiB that never ends
        writer.write(b"v" * 1024)
        await writer.drain()
    await reader.read()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (_garbage, "bad response"),
        (_endless_head, "bad response: response head over 65536 bytes"),
        (_endless_line, "bad response: response head over 65536 bytes"),
    ],
)
async def test_bad_upstream_response_gives_502_naming_it(
    make_gateway, answer: Callable[..., Awaitable[None]], error: str
) -> None:
    up = await RawUpstream(answer).start()
    try:
        gw = await make_gateway()
        gw.routes.set([Route("svc", "/", "c", tries=1)], {"c": [("127.0.0.1", up.port)]})
        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
            r = await client.get("/")
        assert r.status_code == 502 and error in r.json()["error"]
    finally:
        await up.stop()


async def test_upstream_dying_mid_response_cuts_the_client(make_gateway) -> None:
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()

    up = await RawUpstream(dies).start()
    try:
        gw = await make_gateway()
        gw.routes.set([Route("svc", "/", "c", tries=2)], {"c": [("127.0.0.1", up.port)]})
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
        data = await reader.read(-1)  # closed: the client sees a short body, not a lie
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"partial")
        writer.close()
    finally:
        await up.stop()


async def test_client_header_timeout_408_and_idle_close(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway(client_header_timeout=0.3, client_idle_timeout=0.3)
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: sv")
    status, headers, body = await read_response(reader)
    assert status == 408 and headers["connection"] == "close"
    assert "not received in time" in json.loads(body)["error"]
    assert await reader.read(-1) == b""
    writer.close()
    # Idle keep-alive connection: closed silently.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status == 200
    assert await reader.read(-1) == b""
    writer.close()


async def test_early_upstream_answer_is_relayed_and_its_connection_not_reused(
    make_gateway,
) -> None:
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            # Refuses at once, without reading the body it was sent.
            writer.write(b"HTTP/1.1 413 Too Big\r\nContent-Length: 3\r\n\r\nbig")
            await writer.drain()

    up = await RawUpstream(early).start()
    try:
        gw = await make_gateway()
        gw.routes.set([Route("svc", "/", "c", tries=1)], {"c": [("127.0.0.1", up.port)]})
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        # More body left than the gateway reads and drops (DISCARD_BODY_MAX).
        writer.write(b"PUT / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3000000\r\n\r\n")
        writer.write(b"x" * 1000)
        status, _, body = await read_response(reader)
        assert status == 413 and body == b"big"
        assert await reader.read(-1) == b""  # the unread rest of the body: the client is closed
        writer.close()
        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
            r = await client.put("/", content=b"small")
            assert r.status_code == 413 and r.content == b"big"
        assert up.connections == 2  # the half-sent connection was not pooled
    finally:
        await up.stop()


async def test_client_body_timeout_408(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway(client_body_timeout=0.3)
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"PUT /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nab")
    status, headers, body = await read_response(reader)
    assert status == 408 and headers["connection"] == "close"
    assert "body was not received in time" in json.loads(body)["error"]
    assert await reader.read(-1) == b""
    writer.close()


async def test_client_that_stops_reading_is_cut_after_send_timeout(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway(client_send_timeout=0.5, buffer_high_water=65536)
    gw.routes.set([], {"svc": [("127.0.0.1", a.port)]})
    _, writer = await asyncio.open_connection("127.0.0.1", gw.port, limit=65536)
    writer.write(b"GET /bytes/200000000 HTTP/1.1\r\nHost: svc\r\n\r\n")
    await a.app.arrived.wait()
    ctx = gw.server.ctx
    # Never read: the gateway gives up on this client instead of holding the
    # upstream connection (and its buffers) forever.
    await eventually(lambda: not ctx.connections)
    assert ctx.pool.idle_count() == 0
    writer.close()


async def test_try_timeout_budget_stops_retries(make_gateway) -> None:
    async def slow_502(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 502 Bad\r\nContent-Length: 3\r\n\r\nbad")
        await writer.drain()

    ups = [await RawUpstream(slow_502).start() for _ in range(3)]
    try:
        gw = await make_gateway()
        gw.routes.set(
            [Route("svc", "/", "c", tries=3, try_timeout=0.2)],
            {"c": [("127.0.0.1", up.port) for up in ups]},
        )
        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
            r = await client.get("/")
        # The first answer came after the 0.2 s budget: one retry started before it
        # ran out, none after; the last answer is passed through.
        assert r.status_code == 502 and r.content == b"bad"
        assert sum(up.connections for up in ups) == 2
    finally:
        for up in ups:
            await up.stop()


async def test_post_sent_then_timed_out_is_not_resent_to_another_server(make_gateway) -> None:
    # nginx does not pass a non-idempotent request to the next server once it
    # was sent: the first server may be acting on it, and a resend doubles it.
    received: list[bytes] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append((await reader.readuntil(b"\r\n\r\n")).split(b" ")[0])
        await reader.read()  # never answers

    ups = [await RawUpstream(swallow).start() for _ in range(2)]
    try:
        gw = await make_gateway()
        gw.routes.set(
            [Route("svc", "/", "c", tries=2, timeouts=Timeouts(read=0.2))],
            {"c": [("127.0.0.1", up.port) for up in ups]},
        )
        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
            r = await client.post("/", content=b"pay once")
            assert r.status_code == 504
            assert received == [b"POST"]
            # An idempotent request is still tried on the next server.
            r = await client.get("/")
            assert r.status_code == 504
            assert received == [b"POST", b"GET", b"GET"]
    finally:
        for up in ups:
            await up.stop()


async def test_response_head_read_in_pieces_after_an_early_hint(make_gateway) -> None:
    """The response head is taken from the bytes as they arrive: a 103 before
    it, and a head split over many reads, give the same head to the client,
    and the connection is reused for the next request."""
    response = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n"
        b"HTTP/1.1 200 Fine Thanks\r\nServer: t\r\nConnection: keep-alive\r\n"
        b"Keep-Alive: timeout=5\r\nX-Long: " + b"v" * 3000 + b"\r\nContent-Length: 2\r\n\r\nok"
    )

    async def in_pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            for start in range(0, len(response), 97):
                writer.write(response[start : start + 97])
                await writer.drain()
                await asyncio.sleep(0)  # the gateway reads this piece before the next

    up = await RawUpstream(in_pieces).start()
    try:
        gw = await make_gateway()
        gw.routes.set([Route("svc", "/", "c", tries=1)], {"c": [("127.0.0.1", up.port)]})
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 Fine Thanks\r\nServer: t\r\nX-Long: vvv")
            assert b"\r\nContent-Length: 2\r\nX-Request-Id: " in head
            assert b"Connection" not in head and b"Keep-Alive" not in head
            assert await reader.readexactly(2) == b"ok"
        writer.close()
        assert up.connections == 1
    finally:
        await up.stop()
