"""imgprocess over real HTTP: outputs are decoded and checked pixel by pixel."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import pyvips

from berth.services.imgprocess.params import encode_b64

from .images import (
    BLACK,
    BLUE,
    GREEN,
    RED,
    WHITE,
    YELLOW,
    animation,
    assert_quadrants,
    close,
    decode,
    encode,
    jpeg,
    pixel,
    quadrants,
    solid,
    stored_for_orientation,
)


async def process(
    client: httpx.AsyncClient, data: bytes, params: str = "", **headers: str
) -> httpx.Response:
    response = await client.put(
        f"/photo!{params}" if params else "/photo", content=data, headers=headers
    )
    assert response.status_code == 200, response.text
    return response


async def image_of(client: httpx.AsyncClient, data: bytes, params: str = "") -> pyvips.Image:
    response = await process(client, data, params)
    image = decode(response.content)
    assert response.headers["x-upyun-width"] == str(image.width)
    assert response.headers["x-upyun-height"] == str(
        image.get("page-height") if image.get_typeof("page-height") else image.height
    )
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
async def test_exif_orientations_are_applied(
    imgprocess: httpx.AsyncClient, orientation: int
) -> None:
    data = jpeg(stored_for_orientation(quadrants(80, 60), orientation))
    image = await image_of(imgprocess, data)
    assert (image.width, image.height) == (80, 60)
    assert_quadrants(image)
    assert image.get_typeof("orientation") == 0 or image.get("orientation") == 1
    # ... also through the shrink-on-load path, and through the thumbnail in the right frame.
    small = await image_of(
        imgprocess, jpeg(stored_for_orientation(quadrants(800, 600), orientation)), "/fw/80"
    )
    assert (small.width, small.height) == (80, 60)
    assert_quadrants(small)


async def test_orientation_can_be_left_alone(imgprocess: httpx.AsyncClient) -> None:
    data = jpeg(stored_for_orientation(quadrants(80, 60), 6))
    image = await image_of(imgprocess, data, "/autoorient/false")
    assert (image.width, image.height) == (60, 80)


@pytest.mark.parametrize(
    ("suffix", "mime"),
    [
        (".jpg", "image/jpeg"),
        (".png", "image/png"),
        (".webp", "image/webp"),
        (".gif", "image/gif"),
        (".tif", "image/jpeg"),  # TIFF is answered in a web format
        (".avif", "image/avif"),
    ],
)
async def test_every_input_format(imgprocess: httpx.AsyncClient, suffix: str, mime: str) -> None:
    response = await process(imgprocess, encode(quadrants(200, 100), suffix), "/fw/100")
    assert response.headers["content-type"] == mime
    image = decode(response.content)
    assert (image.width, image.height) == (100, 50)
    assert_quadrants(image, tolerance=60)


@pytest.mark.parametrize(
    ("fmt", "mime", "file_type"),
    [
        ("jpg", "image/jpeg", "JPEG"),
        ("png", "image/png", "PNG"),
        ("webp", "image/webp", "WEBP"),
        ("avif", "image/avif", "AVIF"),
        ("gif", "image/gif", "GIF"),
    ],
)
async def test_every_output_format(
    imgprocess: httpx.AsyncClient, fmt: str, mime: str, file_type: str
) -> None:
    response = await process(imgprocess, jpeg(quadrants(200, 100)), f"/fwfh/100x100/format/{fmt}")
    assert response.headers["content-type"] == mime
    assert response.headers["x-upyun-file-type"] == file_type
    assert response.headers["x-upyun-frames"] == "1"
    assert "vary" not in response.headers
    image = decode(response.content)
    assert (image.width, image.height) == (100, 50)
    assert_quadrants(image, tolerance=60)


async def test_resize_modes(imgprocess: httpx.AsyncClient) -> None:
    data = jpeg(quadrants(600, 400))
    sizes = {
        "/fw/300": (300, 200),
        "/fh/100": (150, 100),
        "/fw/300/fh/100": (150, 100),
        "/fwfh2/300x300": (450, 300),
        "/max/150": (150, 100),
        "/min/100": (150, 100),
        "/scale/50": (300, 200),
        "/wscale/50": (300, 400),
        "/hscale/150": (600, 600),
        "/fp/60000": (300, 200),
        "/fw/900": (600, 400),  # never enlarged unless forced
        "/fw/900/force/true": (900, 600),
        "/both/100x100/force/true": (100, 100),
    }
    for params, size in sizes.items():
        image = await image_of(imgprocess, data, params)
        assert (image.width, image.height) == size, params
        if "wscale" not in params and "hscale" not in params and "force" not in params:
            assert_quadrants(image)


async def test_tiny_jpeg_to_one_pixel(imgprocess: httpx.AsyncClient) -> None:
    # The shrink-on-load factor once rounded the size up: 1/8 of 5x3 is no image at all.
    image = await image_of(imgprocess, jpeg(solid(5, 3, RED)), "/fw/1")
    assert (image.width, image.height) == (1, 1)
    assert close(pixel(image, 0, 0), RED)


async def test_both_and_sq_crop_the_centre(imgprocess: httpx.AsyncClient) -> None:
    # Left third red, middle green, right third blue: a centre crop keeps only green.
    third = 300
    data = jpeg(
        solid(third, 300, RED)
        .join(solid(third, 300, GREEN), "horizontal")
        .join(solid(third, 300, BLUE), "horizontal")
    )
    for params in ("/both/100x150", "/sq/100"):
        image = await image_of(imgprocess, data, params)
        assert image.width == 100
        assert close(pixel(image, 2, 10), GREEN) and close(pixel(image, 97, 10), GREEN), params


async def test_crop_before_and_clip_after_resize(imgprocess: httpx.AsyncClient) -> None:
    data = jpeg(quadrants(400, 200))
    image = await image_of(imgprocess, data, "/crop/100x50/gravity/southeast")
    assert (image.width, image.height) == (100, 50)
    assert close(pixel(image, 50, 25), YELLOW)
    # Crop 200x100 at the top-right (green) first, then halve: 100x50 of green.
    image = await image_of(imgprocess, data, "/crop/200x100a200a0/fw/100")
    assert (image.width, image.height) == (100, 50)
    assert close(pixel(image, 50, 25), GREEN)
    # Halve to 200x100 first, then clip 50x50 at (150, 60): the yellow quadrant.
    image = await image_of(imgprocess, data, "/fw/200/clip/50x50a150a60")
    assert (image.width, image.height) == (50, 40)  # clipped to the edge
    assert close(pixel(image, 25, 20), YELLOW)
    response = await imgprocess.put("/!/crop/10x10a500a0", content=data)
    assert response.status_code == 400 and response.json()["error"] == "bad_request"


async def test_rotate_and_flip(imgprocess: httpx.AsyncClient) -> None:
    data = jpeg(quadrants(80, 60))
    image = await image_of(imgprocess, data, "/rotate/90")
    assert (image.width, image.height) == (60, 80)
    assert close(pixel(image, 45, 20), RED) and close(pixel(image, 15, 20), BLUE)
    image = await image_of(imgprocess, data, "/rotate/180")
    assert close(pixel(image, 10, 10), YELLOW)
    image = await image_of(imgprocess, data, "/flip/left,right")
    assert close(pixel(image, 10, 10), GREEN) and close(pixel(image, 70, 50), BLUE)
    image = await image_of(imgprocess, data, "/flip/top,down")
    assert close(pixel(image, 10, 10), BLUE)
    image = await image_of(imgprocess, encode(quadrants(80, 60), ".png"), "/rotate/45")
    assert image.width > 80 and image.hasalpha()
    assert pixel(image, 0, 0)[3] == 0  # corners outside the turned image are transparent
    # Turned clockwise, the red top-left quadrant is now straight above the centre.
    assert close(pixel(image, image.width // 2, 30), RED, 60)


def assert_corners(image: pyvips.Image, colours: tuple[Any, Any, Any, Any]) -> None:
    """Top-left, top-right, bottom-left, bottom-right quadrant centres."""
    w, h = image.width, image.height
    points = [
        (w // 4, h // 4),
        (3 * w // 4, h // 4),
        (w // 4, 3 * h // 4),
        (3 * w // 4, 3 * h // 4),
    ]
    got = [pixel(image, x, y)[:3] for x, y in points]
    assert all(close(g, c) for g, c in zip(got, colours, strict=True)), got


@pytest.mark.parametrize("suffix", [".png", ".webp", ".tif"])
async def test_turns_after_the_resize_on_streamed_inputs(
    imgprocess: httpx.AsyncClient, suffix: str
) -> None:
    """EXIF orientation, rotate and a vertical flip on non-JPEG inputs with a resize:
    the source streams, the small result is turned. Pixels must say the same as before."""
    for orientation in range(1, 9):
        stored = stored_for_orientation(quadrants(400, 300), orientation)
        image = await image_of(imgprocess, encode(stored, suffix), "/fw/80")
        assert (image.width, image.height) == (80, 60), orientation
        assert_quadrants(image)
        cover = await image_of(imgprocess, encode(stored, suffix), "/sq/40")
        assert (cover.width, cover.height) == (40, 40), orientation
        assert_quadrants(cover)
    data = encode(stored_for_orientation(quadrants(400, 300), 6), suffix)
    turned = await image_of(imgprocess, data, "/fw/80/rotate/90")
    assert (turned.width, turned.height) == (60, 80)
    assert_corners(turned, (BLUE, RED, YELLOW, GREEN))
    flipped = await image_of(imgprocess, data, "/max/80/flip/top,down")
    assert (flipped.width, flipped.height) == (80, 60)
    assert_corners(flipped, (BLUE, YELLOW, RED, GREEN))
    both = await image_of(imgprocess, data, "/fw/40/rotate/270/flip/left,right")
    assert (both.width, both.height) == (30, 40)
    # Turned anticlockwise (TL green, TR yellow, BL red, BR blue), then mirrored.
    assert_corners(both, (YELLOW, GREEN, BLUE, RED))


async def test_blur_and_unsharp(imgprocess: httpx.AsyncClient) -> None:
    # A hard black/white edge becomes a ramp when blurred.
    data = encode(solid(50, 20, BLACK).join(solid(50, 20, WHITE), "horizontal"), ".png")
    sharp = await image_of(imgprocess, data)
    blurred = await image_of(imgprocess, data, "/gaussblur/10x4")
    assert pixel(sharp, 48, 10)[0] < 10 and pixel(sharp, 52, 10)[0] > 245
    assert 40 < pixel(blurred, 48, 10)[0] < 128 < pixel(blurred, 52, 10)[0] < 215
    unsharp = await image_of(imgprocess, encode(quadrants(80, 60), ".png"), "/unsharp/true")
    assert_quadrants(unsharp)


async def test_border_canvas_and_roundrect(imgprocess: httpx.AsyncClient) -> None:
    data = encode(solid(40, 20, RED), ".png")
    image = await image_of(imgprocess, data, "/border/5x3/brdcolor/0000FF")
    assert (image.width, image.height) == (50, 26)
    assert close(pixel(image, 1, 1), BLUE, 0) and close(pixel(image, 25, 13), RED, 0)
    image = await image_of(imgprocess, data, "/canvas/100x50/cvscolor/00FF00")
    assert (image.width, image.height) == (100, 50)
    assert close(pixel(image, 5, 5), GREEN, 0) and close(pixel(image, 50, 25), RED, 0)
    image = await image_of(imgprocess, data, "/canvas/100x50a0a30/cvscolor/FFFFFFFF")
    assert pixel(image, 5, 5)[3] == 0 and close(pixel(image, 5, 35), (*RED, 255), 0)
    image = await image_of(imgprocess, data, "/roundrect/10")
    assert image.hasalpha()
    assert pixel(image, 0, 0)[3] == 0 and pixel(image, 20, 10)[3] == 255
    assert pixel(image, 20, 0)[3] == 255  # straight edges stay opaque


async def test_text_and_image_watermarks(imgprocess: httpx.AsyncClient) -> None:
    data = encode(solid(300, 100, WHITE), ".png")
    text = encode_b64("BERTH")
    image = await image_of(
        imgprocess,
        data,
        f"/watermark/text/{text}/size/40/color/000000/align/southeast/margin/10x10",
    )
    right = image.crop(150, 40, 150, 60)
    left = image.crop(0, 0, 100, 40)
    assert right.min() < 50  # dark text at the bottom right
    assert left.min() > 250  # and nothing elsewhere
    logo = encode_b64("/blue.png")
    image = await image_of(imgprocess, data, f"/watermark/url/{logo}/align/southeast/margin/10x10")
    assert close(pixel(image, 300 - 10 - 10, 100 - 10 - 10), BLUE, 0)
    assert close(pixel(image, 300 - 5, 100 - 5), WHITE, 0)
    image = await image_of(imgprocess, data, f"/watermark/url/{logo}/align/center/opacity/50")
    assert close(pixel(image, 150, 50), (127, 127, 255), 3)
    image = await image_of(imgprocess, data, f"/watermark/url/{logo}/repeat/true/margin/10x10")
    assert close(pixel(image, 5, 5), BLUE, 0) and close(pixel(image, 35, 35), BLUE, 0)
    assert close(pixel(image, 25, 25), WHITE, 0)
    for bad in (encode_b64("../etc/passwd"), encode_b64("/missing.png")):
        response = await imgprocess.put(f"/!/watermark/url/{bad}", content=data)
        assert response.status_code == 400, response.text


async def test_colour_management(imgprocess: httpx.AsyncClient) -> None:
    # Display P3 red has different numbers from sRGB red; honouring the
    # embedded profile brings it back to sRGB (255, 0, 0).
    p3 = solid(32, 32, RED).icc_export(output_profile="p3")
    raw = pixel(p3, 1, 1)
    assert not close(raw, RED, 15)
    image = await image_of(imgprocess, encode(p3, ".png"))
    assert close(pixel(image, 5, 5), RED, 8)
    assert image.get_typeof("icc-profile-data") == 0  # stripped: the pixels are sRGB now
    ignored = await image_of(imgprocess, encode(p3, ".png"), "/noicc/true")
    assert close(pixel(ignored, 5, 5), raw, 3)
    # A damaged profile is ignored (as browsers do), not a failed request.
    data = bytearray(jpeg(p3))
    start = data.find(p3.get("icc-profile-data")[36:60])
    for i in range(start + 100, start + 200):
        data[i] ^= 0x5A
    damaged = await image_of(imgprocess, bytes(data))
    assert close(pixel(damaged, 5, 5), raw, 8)


async def test_both_jpeg_decoders_give_the_same_thumbnail(imgprocess: httpx.AsyncClient) -> None:
    # A stripped JPEG thumbnail is decoded by TurboJPEG, one keeping EXIF by libvips:
    # with a P3 profile and a turn, the two routes must agree pixel for pixel.
    p3 = stored_for_orientation(quadrants(480, 360), 6).icc_export(output_profile="p3")
    p3.set_type(pyvips.GValue.gint_type, "orientation", 6)
    data = jpeg(p3)
    for params in ("/fw/60", "/sq/50", "/fwfh/100x100/rotate/90"):
        fast = await image_of(imgprocess, data, params)
        slow = await image_of(imgprocess, data, params + "/exifswitch/true")
        assert (fast.width, fast.height) == (slow.width, slow.height), params
        assert (fast.cast("int") - slow.cast("int")).abs().max() <= 1, params
        if "rotate" not in params:
            assert_quadrants(fast, tolerance=90)  # upright; P3 blue comes back purplish


async def test_cmyk_jpeg_with_and_without_profile(imgprocess: httpx.AsyncClient) -> None:
    cmyk = solid(32, 32, (200, 40, 40)).icc_export(output_profile="cmyk")
    for data in (
        jpeg(cmyk),
        jpeg(
            cmyk.copy()
            .__class__.new_from_memory(cmyk.write_to_memory(), 32, 32, 4, "uchar")
            .copy(interpretation="cmyk")
        ),
    ):
        image = await image_of(imgprocess, data)
        assert image.bands == 3 and image.interpretation == "srgb"
        assert close(pixel(image, 5, 5), (200, 40, 40), 45), pixel(image, 5, 5)


async def test_16bit_png_and_alpha(imgprocess: httpx.AsyncClient) -> None:
    deep = (solid(20, 20, (255, 128, 0)).cast("ushort") * 257).copy(interpretation="rgb16")
    image = await image_of(imgprocess, encode(deep, ".png", bitdepth=16))
    assert image.format == "uchar" and close(pixel(image, 5, 5), (255, 128, 0), 2)
    half = solid(20, 20, GREEN).bandjoin(255).join(solid(20, 20, GREEN).bandjoin(0), "horizontal")
    png = await image_of(imgprocess, encode(half, ".png"), "/fw/20/force/true")
    assert png.hasalpha() and pixel(png, 2, 5)[3] == 255 and pixel(png, 18, 5)[3] == 0
    flat = await image_of(imgprocess, encode(half, ".png"), "/format/jpg")
    assert close(pixel(flat, 35, 5), WHITE, 3)  # transparent becomes white in JPEG


async def test_metadata_stripped_unless_asked(imgprocess: httpx.AsyncClient) -> None:
    source = quadrants(80, 60).copy()
    source.set_type(pyvips.GValue.gstr_type, "exif-ifd0-Make", "Berth")
    data = jpeg(source)
    assert decode(data).get_typeof("exif-data") != 0
    stripped = await image_of(imgprocess, data)
    assert stripped.get_typeof("exif-data") == 0
    kept = await image_of(imgprocess, data, "/exifswitch/true")
    assert "Berth" in kept.get("exif-ifd0-Make")
    # Kept EXIF must not turn the already upright pixels a second time.
    turned = await image_of(imgprocess, jpeg(stored_for_orientation(source, 6)), "/exifswitch/true")
    assert turned.get("orientation") == 1 and (turned.width, turned.height) == (80, 60)
    assert_quadrants(turned)


async def test_progressive_and_quality(imgprocess: httpx.AsyncClient) -> None:
    data = jpeg(quadrants(200, 100))
    progressive = await image_of(imgprocess, data, "/progressive/true")
    assert progressive.get("interlaced") == 1
    low = await process(imgprocess, data, "/quality/5")
    high = await process(imgprocess, data, "/quality/95")
    assert len(low.content) < len(high.content)
    lossless = await image_of(
        imgprocess, encode(quadrants(64, 64), ".png"), "/format/webp/lossless/true"
    )
    assert_quadrants(lossless, tolerance=0)


async def test_format_auto_negotiates_and_varies(imgprocess: httpx.AsyncClient) -> None:
    data = jpeg(quadrants(80, 60))
    cases = {
        "image/avif,image/webp,*/*": "image/avif",
        "image/webp,*/*;q=0.8": "image/webp",
        "image/avif;q=0,image/webp": "image/webp",
        "*/*": "image/jpeg",
    }
    for accept, mime in cases.items():
        response = await process(imgprocess, data, "/format/auto", accept=accept)
        assert response.headers["content-type"] == mime, accept
        assert response.headers["vary"] == "Accept"
        assert_quadrants(decode(response.content))


async def test_animated_gif_and_webp_keep_their_frames(imgprocess: httpx.AsyncClient) -> None:
    colours = [RED, GREEN, BLUE]
    for suffix, mime in ((".gif", "image/gif"), (".webp", "image/webp")):
        response = await process(imgprocess, encode(animation(colours, 40, 30), suffix), "/fw/20")
        assert response.headers["content-type"] == mime
        assert response.headers["x-upyun-frames"] == "3"
        assert (response.headers["x-upyun-width"], response.headers["x-upyun-height"]) == (
            "20",
            "15",
        )
        frames = decode(response.content, n=-1)
        assert frames.get("page-height") == 15 and frames.height == 45
        for i, colour in enumerate(colours):
            assert close(pixel(frames, 10, i * 15 + 7), colour, 10), (suffix, i)
    # A GIF to WebP keeps the animation; gifto keeps only the first frame.
    response = await process(
        imgprocess, encode(animation(colours), ".gif"), "/format/webp/rotate/90"
    )
    assert response.headers["x-upyun-frames"] == "3"
    frames = decode(response.content, n=-1)
    assert (frames.width, frames.get("page-height")) == (30, 40)
    response = await process(imgprocess, encode(animation(colours), ".gif"), "/format/png")
    assert response.headers["x-upyun-frames"] == "1"  # a still format gets the first frame
    response = await process(imgprocess, encode(animation(colours), ".gif"), "/gifto/true")
    assert response.headers["x-upyun-frames"] == "1"
    assert close(pixel(decode(response.content), 5, 5), RED, 10)


async def test_x_gmkerl_thumb_header(imgprocess: httpx.AsyncClient) -> None:
    response = await imgprocess.put(
        "/cat.jpg",
        content=jpeg(quadrants(200, 100)),
        headers={"x-gmkerl-thumb": "/fw/50/format/png"},
    )
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-upyun-width"] == "50"


async def test_json_pipeline(imgprocess: httpx.AsyncClient) -> None:
    data = jpeg(quadrants(200, 100))
    operations = [{"fw": 100}, {"format": "png"}, {"watermark": {"text": "<b>&", "size": 10}}]
    response = await imgprocess.post(
        "/pipeline", files={"file": ("a.jpg", data)}, data={"operations": json.dumps(operations)}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert decode(response.content).width == 100
    response = await imgprocess.post(
        "/pipeline", content=data, headers={"x-pipeline": '[{"fw": 40}]'}
    )
    assert decode(response.content).width == 40
    for bad, key in (('[{"fw": "x"}]', "fw:"), ("not json", "operations"), ('[{"zz": 1}]', "zz")):
        response = await imgprocess.post("/pipeline", content=data, headers={"x-pipeline": bad})
        assert response.status_code == 400
        assert response.json()["message"].startswith(key)
    response = await imgprocess.post("/pipeline", content=data)
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("params", "key"),
    [("/fw/abc", "fw"), ("/nope/1", "nope"), ("/quality/0", "quality"), ("/scale/1000", "scale")],
)
async def test_bad_parameters_are_400_naming_the_key(
    imgprocess: httpx.AsyncClient, params: str, key: str
) -> None:
    # /scale/1000 on 2000 px is 20000 px a side: over the output limit.
    response = await imgprocess.put(f"/!{params}", content=jpeg(solid(2000, 10, RED)))
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_parameter"
    assert body["message"].startswith(f"{key}:")


async def test_truncated_and_corrupt_files(imgprocess: httpx.AsyncClient) -> None:
    whole = jpeg(
        pyvips.Image.gaussnoise(400, 300).cast("uchar").bandjoin([0, 0]).copy(interpretation="srgb")
    )
    response = await imgprocess.put("/", content=whole[: len(whole) // 2])
    assert response.status_code == 400
    assert response.json()["error"] == "corrupt_image"
    png = encode(pyvips.Image.gaussnoise(200, 200).cast("uchar"), ".png")
    response = await imgprocess.put("/", content=png[: len(png) // 2])
    assert response.status_code == 400
    assert response.json()["error"] == "corrupt_image"
    response = await imgprocess.put("/", content=b"%PDF-1.4 not an image")
    assert response.status_code == 415
    assert (await imgprocess.get("/health")).json()["status"] == "ok"


async def test_decompression_bomb(imgprocess: httpx.AsyncClient) -> None:
    bomb = encode(pyvips.Image.black(8000, 8000).cast("uchar"), ".png", compression=9)
    response = await imgprocess.put("/!/fw/10", content=bomb)
    assert response.status_code == 422
    assert response.json()["error"] == "image_too_large"


async def test_processing_time_limit(start_imgprocess: Callable[..., Any]) -> None:
    big = encode(quadrants(1000, 1000), ".png")
    async with start_imgprocess(timeout_processing=0.000001) as (client, _):
        for params in ("/gaussblur/50x50", "/fw/500/rotate/90/gaussblur/50x50"):
            # The second turns an in-memory copy of the resized image: also under the limit.
            response = await client.put(f"/!{params}", content=big)
            assert response.status_code == 504, params
            assert response.json()["error"] == "processing_timeout"
        assert (await client.get("/health")).status_code == 200


async def test_mangled_images_never_crash_either_service(
    imgprocess: httpx.AsyncClient, imageinfo: httpx.AsyncClient
) -> None:
    """Truncated, bit-flipped and spliced files of every format: a JSON error or an image."""
    rnd = random.Random(5)
    seeds = [
        encode(quadrants(64, 48), s) for s in (".jpg", ".png", ".webp", ".gif", ".tif", ".avif")
    ]
    seeds.append(encode(animation([RED, GREEN]), ".gif"))
    seeds.append(encode(animation([RED, GREEN]), ".webp"))
    seen: set[int] = set()
    for _ in range(80):
        data = bytearray(rnd.choice(seeds))
        kind = rnd.randrange(3)
        if kind == 0:
            data = data[: rnd.randrange(1, len(data))]
        elif kind == 1:
            for _ in range(rnd.randrange(1, 20)):
                data[rnd.randrange(len(data))] = rnd.randrange(256)
        else:
            at = rnd.randrange(len(data))
            data[at:at] = rnd.randbytes(rnd.randrange(1, 50))
        for client, path in ((imgprocess, "/!/fw/30/format/png"), (imageinfo, "/")):
            response = await client.put(path, content=bytes(data))
            seen.add(response.status_code)
            assert response.status_code in (200, 400, 415, 422), response.text
            if response.status_code != 200:
                assert set(response.json()) == {"error", "message"}
    assert {200, 400} <= seen
    assert (await imgprocess.get("/health")).status_code == 200
