"""HEIC: pyvips-binary reads a HEIC's header but has no HEVC decoder for its pixels.

quadrants.heic is a real HEIC (64x48, :func:`images.quadrants`), made with
libheif's heif-enc (x265) because pyvips-binary cannot encode HEVC either.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pyvips

from berth.services.config import ImgProcessConfig
from berth.services.imaging import HEIC, probe

HEIC_FILE = Path(__file__).with_name("quadrants.heic")


def test_the_fixture_is_a_hevc_heic() -> None:
    data = HEIC_FILE.read_bytes()
    assert data[4:12] == b"ftypheic"
    found = probe(data, ImgProcessConfig())
    assert found.format is HEIC and (found.width, found.height) == (64, 48)
    assert found.image.get("heif-compression") == "hevc"


async def test_imgprocess_refuses_heic_as_unsupported(imgprocess: httpx.AsyncClient) -> None:
    data = HEIC_FILE.read_bytes()
    for params in ("", "/fw/32", "/format/png"):
        response = await imgprocess.put(f"/photo.heic!{params}", content=data)
        assert response.status_code == 415, response.text
        assert response.json()["error"] == "unsupported_media_type"
        assert "HEIC" in response.json()["message"]
    # AVIF goes through the same libheif loader and still works.
    avif = pyvips.Image.black(16, 16, bands=3).cast("uchar").heifsave_buffer(compression="av1")
    response = await imgprocess.put("/photo.avif!/format/png", content=bytes(avif))
    assert response.status_code == 200, response.text


async def test_imageinfo_describes_heic_from_its_header(imageinfo: httpx.AsyncClient) -> None:
    response = await imageinfo.put("/photo.heic", content=HEIC_FILE.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["format"], body["mime"], body["width"], body["height"]) == (
        "heic", "image/heic", 64, 48
    )  # fmt: skip
    assert response.headers["x-upyun-file-type"] == "HEIC"
