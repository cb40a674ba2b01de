"""Hostile requests found in review: each once answered 500, 400 for a timeout, or ran unbounded."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import pyvips

from berth.services.imgprocess.params import encode_b64

from .images import RED, animation, encode, solid


async def test_watermark_path_with_a_nul_byte_is_400(imgprocess: httpx.AsyncClient) -> None:
    data = encode(solid(50, 50, RED), ".png")
    path = encode_b64("a\x00.png")
    response = await imgprocess.put(f"/!/watermark/url/{path}", content=data)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_request"


async def test_watermark_that_is_not_an_image_names_the_parameter(
    imgprocess: httpx.AsyncClient, watermark_dir: Any
) -> None:
    (watermark_dir / "notes.txt").write_text("not an image")
    data = encode(solid(50, 50, RED), ".png")
    response = await imgprocess.put(f"/!/watermark/url/{encode_b64('notes.txt')}", content=data)
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith("watermark/url:")


async def test_time_limit_is_504_for_every_output_format(
    start_imgprocess: Callable[..., Any],
) -> None:
    # PNG's writer reported the kill as "unable to write to target": it was a 400.
    data = encode(solid(1000, 1000, RED).bandjoin(255), ".png")
    async with start_imgprocess(timeout_processing=0.000001) as (client, _):
        for fmt in ("png", "jpg", "webp", "gif"):
            response = await client.put(f"/!/gaussblur/50x50/format/{fmt}", content=data)
            assert response.status_code == 504, (fmt, response.text)
            assert response.json()["error"] == "processing_timeout"


async def test_watermark_count_is_bounded(imgprocess: httpx.AsyncClient) -> None:
    # Each watermark is one more composite: thousands of them ran for minutes.
    group = f"/watermark/text/{encode_b64('ab')}/size/5"
    data = encode(solid(50, 50, RED), ".png")
    response = await imgprocess.put("/!" + group * 200, content=data)
    assert response.status_code == 400
    assert response.json()["message"].startswith("watermark")
    response = await imgprocess.put("/!" + group * 3, content=data)
    assert response.status_code == 200


async def test_result_pixels_are_bounded_over_all_frames(
    start_imgprocess: Callable[..., Any],
) -> None:
    # Enlarging a many-frame animation multiplies the limit of one side by the frames.
    frames = animation([(i * 20, 0, 0) for i in range(10)], width=20, height=2)
    data = encode(frames, ".gif")
    async with start_imgprocess(limit_pixels=500_000) as (client, _):
        response = await client.put("/!/fw/1000/force/true", content=data)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error"] == "invalid_parameter" and body["message"].startswith("fw:")
        response = await client.put("/!/fw/200/force/true", content=data)
        assert response.status_code == 200
        assert response.headers["x-upyun-frames"] == "10"
        assert pyvips.Image.new_from_buffer(response.content, "").width == 200


async def test_client_leaving_mid_upload_is_not_an_internal_error(
    start_imageinfo: Callable[..., Any],
) -> None:
    async with start_imageinfo() as (client, _):
        url = urlsplit(str(client.base_url))
        _, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"\xff" * 10)
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        metrics = ""
        for _ in range(500):
            metrics = (await client.get("/metrics")).text
            if "berth_service_errors_total" in metrics:
                break
            await asyncio.sleep(0.01)
        assert 'code="internal"' not in metrics, metrics
        assert 'code="client_disconnected"' in metrics


async def test_a_stalled_upload_gives_its_place_back(start_imageinfo: Callable[..., Any]) -> None:
    # One place only: a client that sends half its body and stalls held it forever.
    async with start_imageinfo(workers=1, limit_queue=0, timeout_body=0.5) as (client, service):
        url = urlsplit(str(client.base_url))
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"\xff" * 10)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        writer.close()
        await writer.wait_closed()
        assert head.startswith(b"HTTP/1.1 408 "), head
        assert "running=0 queued=0" in repr(service.shell.pool)
        small = encode(solid(10, 10, RED), ".png")
        assert (await client.put("/", content=small)).status_code == 200


def _send_head_and_read(host: str, port: int, head: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


async def test_an_endless_request_head_is_cut_off(start_imageinfo: Callable[..., Any]) -> None:
    # httptools buffered the head without limit: 300 MB of headers took 300 MB of memory.
    async with start_imageinfo() as (client, _):
        url = urlsplit(str(client.base_url))
        assert url.hostname is not None and url.port is not None
        head = b"PUT / HTTP/1.1\r\nHost: x\r\n" + b"x-filler: " + b"a" * 70_000
        answer = await asyncio.to_thread(_send_head_and_read, url.hostname, url.port, head)
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
        assert b'"error": "headers_too_large"' in answer
        # A big but reasonable head still works, and so does a head and a large body
        # arriving in one read.
        small = encode(solid(10, 10, RED), ".png")
        response = await client.put("/", content=small, headers={"x-big": "b" * 30_000})
        assert response.status_code == 200
        noise = encode(pyvips.Image.gaussnoise(300, 300, sigma=80).cast("uchar"), ".png")
        assert len(noise) > 70_000
        request = b"PUT / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        answer = await asyncio.to_thread(
            _send_head_and_read, url.hostname, url.port, request % len(noise) + noise
        )
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


async def test_a_stalled_request_head_is_closed(start_imageinfo: Callable[..., Any]) -> None:
    # uvicorn has no timer on a request head: a connection that sends half a head, or
    # nothing at all, stayed open for ever (slowloris).
    async with start_imageinfo(timeout_body=0.5) as (client, _):
        url = urlsplit(str(client.base_url))
        assert url.hostname is not None and url.port is not None
        half = b"PUT / HTTP/1.1\r\nHost: x\r\nx-slow: "
        answer = await asyncio.to_thread(_send_head_and_read, url.hostname, url.port, half)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
        assert b'"error": "head_timeout"' in answer
        silent = await asyncio.to_thread(_send_head_and_read, url.hostname, url.port, b"")
        assert silent == b""
        assert (await client.get("/health")).status_code == 200


async def test_extra_bands_are_dropped_not_an_error(imgprocess: httpx.AsyncClient) -> None:
    # libvips counts the last of five bands as alpha; a four-value background then failed.
    five = solid(40, 20, RED).bandjoin([255, 7]).copy(interpretation="multiband")
    response = await imgprocess.put("/!/rotate/45/format/png", content=encode(five, ".tif"))
    assert response.status_code == 200, response.text
    image = pyvips.Image.new_from_buffer(response.content, "")
    assert image.bands == 4
    assert image(image.width // 2, image.height // 2)[:3] == [255, 0, 0]


async def test_deeply_nested_pipeline_json_is_400(imgprocess: httpx.AsyncClient) -> None:
    # json.loads raises RecursionError, not ValueError, on deep nesting: it was a 500.
    data = encode(solid(10, 10, RED), ".png")
    response = await imgprocess.post(
        "/pipeline", content=data, headers={"x-pipeline": "[" * 50_000}
    )
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith("operations:")


async def test_parameters_that_cannot_apply_name_their_key(imgprocess: httpx.AsyncClient) -> None:
    # These were 400 corrupt_image, blaming the upload for a parameter.
    data = encode(solid(100, 80, RED), ".png")
    for params, key in (
        (f"/watermark/text/{encode_b64(' ')}", "watermark/text:"),
        (f"/watermark/text/{encode_b64(chr(0x200B))}", "watermark/text:"),
        ("/canvas/10x10a500a500", "canvas:"),
    ):
        response = await imgprocess.put(f"/!{params}", content=data)
        assert response.status_code == 400, (params, response.text)
        body = response.json()
        assert body["error"] == "invalid_parameter", (params, body)
        assert body["message"].startswith(key), (params, body)


async def test_head_timeout_waits_for_the_response_ahead_of_it(
    start_imageinfo: Callable[..., Any],
) -> None:
    async with start_imageinfo(workers=1, limit_queue=1, timeout_body=0.2) as (client, service):
        release, started = threading.Event(), threading.Event()

        def hold() -> None:
            started.set()
            release.wait(30)

        blocker = asyncio.create_task(service.shell.pool.run(hold))
        await asyncio.to_thread(started.wait, 30)
        url = urlsplit(str(client.base_url))
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        small = encode(solid(10, 10, RED), ".png")
        first = b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(small)
        writer.write(first + small + b"PUT / HTTP/1.1\r\nHost: x\r\nx-half: ")
        await writer.drain()
        # Nothing to await: the head timer has to fire while the first request waits.
        await asyncio.sleep(1.0)
        release.set()
        await blocker
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
        assert b"HTTP/1.1 408 " in answer


async def test_metrics_count_what_the_protocol_answers_itself(
    start_imageinfo: Callable[..., Any],
) -> None:
    # 431, 408 and the parser's 400 are sent before the application sees a request;
    # /metrics once counted none of them.
    async with start_imageinfo(timeout_body=0.5) as (client, _):
        url = urlsplit(str(client.base_url))
        assert url.hostname is not None and url.port is not None
        sends = {
            b"431": b"PUT / HTTP/1.1\r\nHost: x\r\nx-filler: " + b"a" * 70_000,
            b"408": b"PUT / HTTP/1.1\r\nHost: x\r\nx-slow: ",
            b"400": b"PUT / HTTP/1.1\r\nHost x\r\n\r\n",
        }
        for status, head in sends.items():
            answer = await asyncio.to_thread(_send_head_and_read, url.hostname, url.port, head)
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
        assert b'"error": "malformed_request"' in answer  # JSON like every other error
        text = (await client.get("/metrics")).text
        for status, code in (
            ("431", "headers_too_large"),
            ("408", "head_timeout"),
            ("400", "malformed_request"),
        ):
            assert f'requests_total{{service="imageinfo",status="{status}"}} 1.0' in text
            assert f'errors_total{{code="{code}",service="imageinfo"}} 1.0' in text
