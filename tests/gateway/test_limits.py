"""Limits: the pure token bucket, and 429 / 503 / 413 through a real gateway."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from berth.gateway.errors import BodyTooLarge, ConcurrencyLimited, RateLimited
from berth.gateway.limits import (
    ConcurrencyLimiter,
    RateLimiter,
    TokenBucket,
    check_body_size,
    retry_after_seconds,
)
from berth.gateway.routes import Limits, Route
from tests.gateway.conftest import read_response


def test_token_bucket_rate_and_burst() -> None:
    b = TokenBucket.full(rate=2.0, burst=2, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.5)
    assert b.take(0.5) == 0.0  # one token refilled after 1/rate seconds
    assert b.take(0.5) > 0
    assert b.is_full(10.0)
    assert repr(b).startswith("TokenBucket(")


def test_rate_limiter_keys_and_retry_after() -> None:
    limiter = RateLimiter()
    limiter.check("r", "1.1.1.1", 1.0, 0, now=0.0)
    with pytest.raises(RateLimited) as info:
        limiter.check("r", "1.1.1.1", 1.0, 0, now=0.1)
    assert info.value.status == 429 and info.value.retry_after == 1
    limiter.check("r", "2.2.2.2", 1.0, 0, now=0.1)  # another key has its own bucket
    limiter.check("r", "1.1.1.1", 1.0, 0, now=1.1)
    assert "buckets=2" in repr(limiter)
    assert retry_after_seconds(0.01) == 1 and retry_after_seconds(2.2) == 3
    assert retry_after_seconds(math.inf) == 60


def test_concurrency_limiter_and_body_size() -> None:
    c = ConcurrencyLimiter()
    c.acquire("r", 2)
    c.acquire("r", 2)
    with pytest.raises(ConcurrencyLimited) as info:
        c.acquire("r", 2)
    assert info.value.status == 503 and info.value.retry_after == 1
    c.release("r")
    assert c.active("r") == 1
    c.release("r")
    assert repr(c) == "<ConcurrencyLimiter active={}>"
    check_body_size(10, 10)
    check_body_size(10**12, None)
    with pytest.raises(BodyTooLarge):
        check_body_size(11, 10)


async def test_rate_limit_429_with_retry_after(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set(
        [Route("svc", "/", "c", limits=Limits(rate=0.01, burst=2))], {"c": [("127.0.0.1", a.port)]}
    )
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        statuses = [(await client.get("/")).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        r = await client.get("/")
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert "rate limit" in r.json()["error"]


async def test_concurrency_limit_503(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set(
        [Route("svc", "/", "c", limits=Limits(max_concurrent=1))], {"c": [("127.0.0.1", a.port)]}
    )
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        held = asyncio.create_task(client.get("/hold"))
        await a.app.arrived.wait()
        r = await client.get("/")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "in flight" in r.json()["error"]
        a.app.hold.set()
        assert (await held).status_code == 200
        assert (await client.get("/")).status_code == 200


async def test_body_limit_413_by_content_length_and_mid_stream(make_gateway, upstreams) -> None:
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set(
        [Route("svc", "/", "c", limits=Limits(max_body_size=1000))], {"c": [("127.0.0.1", a.port)]}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"PUT / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    )
    status, headers, body = await read_response(reader)
    assert status == 413 and headers["connection"] == "close"
    assert "1000 bytes" in json.loads(body)["error"]
    writer.close()
    # Chunked: the limit is only known to be exceeded mid-stream.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"PUT / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(5):
        writer.write(b"12c\r\n" + b"x" * 300 + b"\r\n")
    status, headers, body = await read_response(reader)
    assert status == 413
    writer.close()
    # Under the limit is fine.
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        r = await client.put("/", content=b"y" * 1000)
        assert r.status_code == 200 and r.json()["body_size"] == 1000


async def test_413_reaches_a_client_still_sending_its_body(make_gateway, upstreams) -> None:
    # The gateway answers before reading the body; closing with it unread would
    # reset the connection and the client would never see the 413.
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set(
        [Route("svc", "/", "c", limits=Limits(max_body_size=1000))], {"c": [("127.0.0.1", a.port)]}
    )
    async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}) as client:
        for _ in range(3):
            r = await client.post("/", content=b"x" * 5_000_000)
            assert r.status_code == 413 and r.headers["connection"] == "close"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5000000\r\n\r\n")
    for _ in range(5):
        writer.write(b"x" * 1_000_000)
        await writer.drain()
    status, _, _ = await read_response(reader)
    assert status == 413
    assert await reader.read() == b""  # and the gateway closed its side
    writer.close()
    assert not a.app.requests
