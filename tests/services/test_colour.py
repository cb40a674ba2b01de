"""Colour: a profile that is sRGB already is not converted through (same pixels, less work)."""

from __future__ import annotations

import httpx
import pyvips

from berth.services.imgprocess.pipeline import is_srgb_profile

from .images import decode, jpeg, quadrants, solid


def profile_of(name: str) -> bytes:
    image = pyvips.Image.black(8, 8, bands=3).copy(interpretation="srgb")
    data: bytes = decode(jpeg(image, profile=name)).get("icc-profile-data")
    return data


def test_srgb_profiles_are_recognised_and_others_are_not() -> None:
    assert is_srgb_profile(profile_of("srgb"))
    assert not is_srgb_profile(profile_of("p3"))
    assert is_srgb_profile(profile_of("srgb"))  # the kept verdict


async def test_srgb_tagged_photo_gives_the_untagged_pixels(imgprocess: httpx.AsyncClient) -> None:
    noise = pyvips.Image.gaussnoise(400, 300, sigma=20, mean=0)
    photo = (quadrants(400, 300) + noise).cast("uchar").copy(interpretation="srgb")
    outputs = []
    for options in ({}, {"profile": "srgb"}):
        response = await imgprocess.put("/a.jpg!/fw/200/format/png", content=jpeg(photo, **options))
        assert response.status_code == 200, response.text
        outputs.append(decode(response.content))
    plain, tagged = outputs
    assert tagged.get_typeof("icc-profile-data") == 0
    assert (plain.cast("int") - tagged.cast("int")).abs().max() <= 1


async def test_p3_tagged_photo_is_still_converted(imgprocess: httpx.AsyncClient) -> None:
    photo = solid(64, 64, (200, 60, 40))
    outputs = []
    for options in ({}, {"profile": "p3"}):
        response = await imgprocess.put("/a.jpg!/fw/32/format/png", content=jpeg(photo, **options))
        assert response.status_code == 200, response.text
        outputs.append(decode(response.content)(16, 16))
    plain, converted = outputs
    # P3's red is more saturated than sRGB's: converted, it needs more red.
    assert converted[0] > plain[0] + 8, (plain, converted)
