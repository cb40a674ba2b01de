"""The TurboJPEG route for JPEG shrink-on-load gives libvips' pixels, or steps aside."""

from __future__ import annotations

import pytest
import pyvips

from berth.services.config import ImgProcessConfig
from berth.services.imaging import probe
from berth.services.imgprocess.turbo_jpeg import decode_shrunk

from .images import decode, jpeg, quadrants, solid, stored_for_orientation

CONFIG = ImgProcessConfig()


def texture(width: int, height: int) -> pyvips.Image:
    noise = pyvips.Image.gaussnoise(width, height, sigma=40, mean=128)
    return (
        noise.bandjoin([noise.rot180(), noise.flip("horizontal")])
        .cast("uchar")
        .copy(interpretation="srgb")
    )


@pytest.mark.parametrize("shrink", [2, 4, 8])
def test_same_pixels_as_libvips_shrink_on_load(shrink: int) -> None:
    data = jpeg(texture(403, 301))
    fast = decode_shrunk(data, probe(data, CONFIG), shrink)
    assert fast is not None
    slow = decode(data, shrink=shrink)
    assert (fast.width, fast.height, fast.bands) == (slow.width, slow.height, slow.bands)
    assert fast.interpretation == "srgb"
    assert (fast.cast("int") - slow.cast("int")).abs().max() == 0


def test_grey_jpeg_icc_profile_and_orientation_travel() -> None:
    grey = jpeg(texture(160, 120)[0].copy(interpretation="b-w"))
    fast = decode_shrunk(grey, probe(grey, CONFIG), 2)
    assert fast is not None and fast.interpretation == "b-w" and fast.bands == 1
    assert (fast.cast("int") - decode(grey, shrink=2).cast("int")).abs().max() == 0

    with_icc = jpeg(stored_for_orientation(quadrants(160, 120), 6), profile="srgb")
    found = probe(with_icc, CONFIG)
    fast = decode_shrunk(with_icc, found, 4)
    assert fast is not None
    assert fast.get("orientation") == 6
    assert fast.get("icc-profile-data") == found.image.get("icc-profile-data")


def test_steps_aside_for_cmyk_and_broken_files() -> None:
    cmyk = jpeg(solid(64, 64, (200, 40, 40)).icc_export(output_profile="cmyk"))
    assert decode_shrunk(cmyk, probe(cmyk, CONFIG), 2) is None
    whole = jpeg(texture(400, 300))
    truncated = whole[: len(whole) // 2]
    assert decode_shrunk(truncated, probe(whole, CONFIG), 2) is None


def test_steps_aside_for_small_images_and_reads_bytearrays() -> None:
    # Below 64 px a scale of 3/8 can give 1/2's size with other pixels.
    small = jpeg(texture(40, 300))
    assert decode_shrunk(small, probe(small, CONFIG), 2) is None
    data = bytearray(jpeg(texture(400, 300)))  # how a large upload arrives
    fast = decode_shrunk(data, probe(data, CONFIG), 8)
    assert fast is not None and (fast.width, fast.height) == (50, 37)
    assert (fast.cast("int") - decode(bytes(data), shrink=8).cast("int")).abs().max() == 0
