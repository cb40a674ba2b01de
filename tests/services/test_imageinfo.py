"""imageinfo over real HTTP, with images made here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
import pyvips

from .images import animation, encode, jpeg, quadrants, solid, stored_for_orientation


async def info(client: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    response = await client.put("/photo.jpg", content=data)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["x-upyun-width"] == str(body["width"])
    assert response.headers["x-upyun-height"] == str(body["height"])
    assert response.headers["x-upyun-frames"] == str(body["frames"])
    return body


async def test_jpeg_with_exif_orientation_and_tags(imageinfo: httpx.AsyncClient) -> None:
    image = stored_for_orientation(quadrants(80, 60), 6)
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Make", "Berth")
    image.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Model", "Test Camera")
    data = jpeg(image, interlace=True)
    response = await imageinfo.put("/", content=data)
    body = response.json()
    assert response.headers["x-upyun-file-type"] == "JPEG"
    assert body == {
        "width": 60,  # as stored
        "height": 80,
        "display_width": 80,  # as shown after orientation 6
        "display_height": 60,
        "format": "jpg",
        "mime": "image/jpeg",
        "frames": 1,
        "orientation": 6,
        "has_alpha": False,
        "bands": 3,
        "colorspace": "srgb",
        "has_icc_profile": False,
        "file_size": len(data),
        "progressive": True,
        "exif": body["exif"],
    }
    assert body["exif"]["Make"] == "Berth"
    assert body["exif"]["Model"] == "Test Camera"
    assert body["exif"]["Orientation"] == 6


@pytest.mark.parametrize(
    ("suffix", "fmt", "file_type"),
    [
        (".png", "png", "PNG"),
        (".webp", "webp", "WEBP"),
        (".gif", "gif", "GIF"),
        (".tif", "tiff", "TIFF"),
        (".avif", "avif", "AVIF"),
    ],
)
async def test_every_format(
    imageinfo: httpx.AsyncClient, suffix: str, fmt: str, file_type: str
) -> None:
    response = await imageinfo.post("/", content=encode(solid(33, 21, (9, 99, 199)), suffix))
    body = response.json()
    assert response.status_code == 200, body
    assert (body["format"], body["width"], body["height"]) == (fmt, 33, 21)
    assert response.headers["x-upyun-file-type"] == file_type


async def test_svg_is_refused_as_untrusted(imageinfo: httpx.AsyncClient) -> None:
    # libvips marks its SVG loader untrusted; with VIPS_BLOCK_UNTRUSTED it cannot run.
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40"></svg>'
    response = await imageinfo.put("/", content=svg)
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"


async def test_alpha_16bit_icc_and_cmyk(imageinfo: httpx.AsyncClient) -> None:
    rgba = solid(10, 10, (1, 2, 3)).bandjoin(128)
    body = await info(imageinfo, encode(rgba, ".png"))
    assert body["has_alpha"] and body["bands"] == 4 and body["progressive"] is False

    deep = (solid(10, 10, (255, 0, 0)).cast("ushort") * 256).copy(interpretation="rgb16")
    body = await info(imageinfo, encode(deep, ".png", bitdepth=16))
    assert body["colorspace"] == "rgb16"

    p3 = solid(10, 10, (255, 0, 0)).icc_export(output_profile="p3")
    assert (await info(imageinfo, jpeg(p3)))["has_icc_profile"] is True

    cmyk = solid(10, 10, (255, 0, 0)).icc_export(output_profile="cmyk")
    body = await info(imageinfo, jpeg(cmyk))
    assert (body["colorspace"], body["bands"]) == ("cmyk", 4)


async def test_animated_gif_and_webp_count_frames(imageinfo: httpx.AsyncClient) -> None:
    frames = animation([(255, 0, 0), (0, 255, 0), (0, 0, 255)], 40, 30)
    for suffix in (".gif", ".webp"):
        body = await info(imageinfo, encode(frames, suffix))
        assert (body["frames"], body["width"], body["height"]) == (3, 40, 30)


async def test_multipart_upload(imageinfo: httpx.AsyncClient) -> None:
    response = await imageinfo.post(
        "/", files={"file": ("a.png", encode(solid(7, 5, (0, 0, 0)), ".png"))}
    )
    assert response.json()["width"] == 7
    response = await imageinfo.post("/", files={"other": ("a.png", b"x")})
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"just some text, not an image", 415, "unsupported_media_type"),
        (b"PK\x03\x04" + b"\x00" * 100, 415, "unsupported_media_type"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, 400, "corrupt_image"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", 400, "corrupt_image"),
        (b"", 400, "bad_request"),
    ],
)
async def test_bad_input_gets_json_errors(
    imageinfo: httpx.AsyncClient, data: bytes, status: int, code: str
) -> None:
    response = await imageinfo.put("/", content=data)
    assert response.status_code == status
    assert response.json()["error"] == code
    assert response.json()["message"]
    assert (await imageinfo.get("/health")).status_code == 200


async def test_decompression_bomb_is_refused_from_the_header(
    imageinfo: httpx.AsyncClient,
) -> None:
    # 8000x8000 = 64 MP of zeros compresses to a few tens of kB.
    bomb = encode(pyvips.Image.black(8000, 8000).cast("uchar"), ".png", compression=9)
    assert len(bomb) < 200_000
    response = await imageinfo.put("/", content=bomb)
    assert response.status_code == 422
    assert response.json()["error"] == "image_too_large"
    assert "64000000 pixels" in response.json()["message"]


async def test_frames_count_towards_the_pixel_limit(start_imageinfo: Callable[..., Any]) -> None:
    # 3 x 4000 px; distinct colours, or the GIF writer merges the frames.
    frames = encode(animation([(255, 0, 0), (0, 255, 0), (0, 0, 255)], 80, 50), ".gif")
    async with start_imageinfo(limit_pixels=10_000) as (client, _):
        response = await client.put("/", content=frames)
        assert response.status_code == 422, response.text
        assert "x3 frames" in response.json()["message"]
        still = encode(solid(80, 50, (1, 1, 1)), ".gif")
        assert (await client.put("/", content=still)).status_code == 200
    async with start_imageinfo(limit_width=50) as (client, _):
        assert (await client.put("/", content=still)).status_code == 422
