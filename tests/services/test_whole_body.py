"""Large uploads read straight into one buffer (http.BodySink), on asyncio's loop and uvloop.

The services run on uvloop; pytest's loop is asyncio's. Both transports switch
to a BufferedProtocol differently, so each test runs on both.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import pyvips
import uvloop

from berth.services.config import ImageInfoConfig, ImgProcessConfig
from berth.services.http import WHOLE_BODY_MIN_BYTES, whole_body_length
from berth.services.imageinfo import ImageInfoService
from berth.services.imgprocess.app import ImgProcessService

from .conftest import serve
from .images import RED, assert_quadrants, decode, encode, jpeg, quadrants, solid

LOOPS = ["asyncio", "uvloop"]
Test = Callable[[httpx.AsyncClient, Any], Awaitable[None]]


def run_served(loop: str, service: Any, test: Test) -> None:
    async def main() -> None:
        async with serve(service) as (client, running):
            await test(client, running)

    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


def big_png() -> bytes:
    # Uncompressed, so it is over the size that takes the whole-body path.
    data = encode(quadrants(400, 300), ".png", compression=0)
    assert len(data) >= WHOLE_BODY_MIN_BYTES
    return data


def big_jpeg() -> bytes:
    noise = pyvips.Image.gaussnoise(1200, 900, sigma=8, mean=0)
    data = jpeg((quadrants(1200, 900) + noise).cast("uchar").copy(interpretation="srgb"))
    assert len(data) >= WHOLE_BODY_MIN_BYTES
    return data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def connect(client: httpx.AsyncClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(str(client.base_url))
    return await asyncio.open_connection(url.hostname, url.port)


def put(path: str, body: bytes, *extra: bytes) -> bytes:
    head = b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % (path.encode(), len(body))
    return head + b"".join(extra) + b"\r\n" + body


async def wait_for_metric(client: httpx.AsyncClient, text: str) -> str:
    metrics = ""
    for _ in range(500):
        metrics = (await client.get("/metrics")).text
        if text in metrics:
            break
        await asyncio.sleep(0.01)
    return metrics


def test_whole_body_length_takes_only_plain_large_bodies() -> None:
    big = str(WHOLE_BODY_MIN_BYTES).encode()
    assert whole_body_length([(b"content-length", big)]) == WHOLE_BODY_MIN_BYTES
    assert whole_body_length([(b"content-length", b"100")]) is None
    assert whole_body_length([(b"content-length", big), (b"transfer-encoding", b"chunked")]) is None
    assert whole_body_length([(b"content-length", big), (b"content-length", big)]) is None
    assert whole_body_length([(b"host", b"x")]) is None


@pytest.mark.parametrize("loop", LOOPS)
def test_large_uploads_keep_alive_and_pipelined(loop: str) -> None:
    png, small = big_png(), encode(solid(10, 10, RED), ".png")

    async def test(client: httpx.AsyncClient, _: Any) -> None:
        reader, writer = await connect(client)
        try:
            # A large body, then a small request in the same write, then a large one
            # again: the bytes after a body read whole must be parsed as requests.
            writer.write(put("/a.png!/fw/200", png) + put("/b.png!/fw/5", small))
            writer.write(put("/c.png!/fw/100/format/jpg", png))
            await writer.drain()
            answers = [await read_response(reader) for _ in range(3)]
        finally:
            writer.close()
        assert [status for status, _, _ in answers] == [200, 200, 200], answers
        first, second, third = (decode(body) for _, _, body in answers)
        assert (first.width, first.height) == (200, 150)
        assert_quadrants(first)
        assert (second.width, second.height) == (5, 5)
        assert answers[2][1]["content-type"] == "image/jpeg"
        assert (third.width, third.height) == (100, 75)
        assert_quadrants(third)

    run_served(loop, ImgProcessService(ImgProcessConfig()), test)


@pytest.mark.parametrize("loop", LOOPS)
def test_large_jpeg_through_turbojpeg_and_expect_continue(loop: str) -> None:
    data = big_jpeg()

    async def test(client: httpx.AsyncClient, _: Any) -> None:
        reader, writer = await connect(client)
        try:
            # curl sends Expect: 100-continue with large uploads and waits for it.
            head = put("/a.jpg!/fw/300", b"", b"Expect: 100-continue\r\n")
            writer.write(head.replace(b"Content-Length: 0", b"Content-Length: %d" % len(data)))
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert interim.startswith(b"HTTP/1.1 100 "), interim
            writer.write(data)
            await writer.drain()
            status, headers, body = await read_response(reader)
        finally:
            writer.close()
        assert status == 200, body
        image = decode(body)
        assert (image.width, image.height) == (300, 225)
        assert headers["x-upyun-width"] == "300"
        assert_quadrants(image)

    run_served(loop, ImgProcessService(ImgProcessConfig()), test)


@pytest.mark.parametrize("loop", LOOPS)
def test_large_upload_file_size_is_exact(loop: str) -> None:
    png = big_png()

    async def test(client: httpx.AsyncClient, _: Any) -> None:
        response = await client.put("/", content=png)
        assert response.status_code == 200, response.text
        info = response.json()
        assert info["file_size"] == len(png)
        assert (info["width"], info["height"]) == (400, 300)

    run_served(loop, ImageInfoService(ImageInfoConfig()), test)


@pytest.mark.parametrize("loop", LOOPS)
def test_client_leaving_mid_large_body(loop: str) -> None:
    async def test(client: httpx.AsyncClient, service: Any) -> None:
        _, writer = await connect(client)
        writer.write(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n")
        writer.write(b"\xff" * 400_000)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        metrics = await wait_for_metric(client, 'code="client_disconnected"')
        assert 'code="client_disconnected"' in metrics, metrics
        assert 'code="internal"' not in metrics
        assert (await client.put("/", content=big_png())).status_code == 200
        assert "running=0 queued=0" in repr(service.shell.pool)

    run_served(loop, ImageInfoService(ImageInfoConfig()), test)


@pytest.mark.parametrize("loop", LOOPS)
def test_stalled_large_body_is_408_then_closed(loop: str) -> None:
    async def test(client: httpx.AsyncClient, service: Any) -> None:
        reader, writer = await connect(client)
        try:
            # The rest of the body after the timeout must not be read as a request.
            request = b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"
            writer.write(request + b"GET / HTTP/1.1\r\n\r\n" * 20_000)
            await writer.drain()
            status, _, body = await read_response(reader)
            assert status == 408, body
            assert json.loads(body)["error"] == "body_timeout"
            writer.write(b"GET / HTTP/1.1\r\n\r\n" * 100)
            rest = await asyncio.wait_for(reader.read(), 30)
        finally:
            writer.close()
        assert rest == b""  # closed behind the answer, nothing else answered
        assert "running=0 queued=0" in repr(service.shell.pool)
        assert (await client.put("/", content=big_png())).status_code == 200

    run_served(loop, ImageInfoService(ImageInfoConfig(timeout_body=0.5)), test)
