"""Test images made with pyvips, and pixel helpers for checking outputs."""

from __future__ import annotations

from collections.abc import Sequence

import pyvips

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
YELLOW = (255, 255, 0)
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


def solid(width: int, height: int, rgb: Sequence[int]) -> pyvips.Image:
    image = pyvips.Image.black(width, height, bands=3) + list(rgb)
    return image.cast("uchar").copy(interpretation="srgb")


def quadrants(width: int = 80, height: int = 60) -> pyvips.Image:
    """Red top-left, green top-right, blue bottom-left, yellow bottom-right."""
    w, h = width // 2, height // 2
    top = solid(w, h, RED).join(solid(width - w, h, GREEN), "horizontal")
    bottom = solid(w, height - h, BLUE).join(solid(width - w, height - h, YELLOW), "horizontal")
    return top.join(bottom, "vertical").copy(interpretation="srgb")


def stored_for_orientation(image: pyvips.Image, orientation: int) -> pyvips.Image:
    """Pixels to store so that a viewer applying EXIF ``orientation`` shows ``image``.

    Written from the EXIF definitions (the inverse of each display transform),
    not with libvips' autorot, so the test does not check libvips against itself.
    """
    stored = {
        1: lambda im: im,
        2: lambda im: im.flip("horizontal"),
        3: lambda im: im.rot("d180"),
        4: lambda im: im.flip("vertical"),
        5: lambda im: im.rot("d90").flip("horizontal"),  # transpose
        6: lambda im: im.rot("d270"),
        7: lambda im: im.rot("d90").flip("vertical"),  # transverse
        8: lambda im: im.rot("d90"),
    }[orientation](image)
    stored = stored.copy()
    stored.set_type(pyvips.GValue.gint_type, "orientation", orientation)
    return stored


def jpeg(image: pyvips.Image, **options: object) -> bytes:
    return bytes(image.jpegsave_buffer(Q=95, **options))


def encode(image: pyvips.Image, suffix: str, **options: object) -> bytes:
    return bytes(image.write_to_buffer(suffix, **options))


def animation(colours: Sequence[Sequence[int]], width: int = 40, height: int = 30) -> pyvips.Image:
    frames = [solid(width, height, c) for c in colours]
    strip = pyvips.Image.arrayjoin(frames, across=1).copy(interpretation="srgb")
    strip.set_type(pyvips.GValue.gint_type, "page-height", height)
    strip.set_type(pyvips.GValue.array_int_type, "delay", [100] * len(colours))
    strip.set_type(pyvips.GValue.gint_type, "loop", 0)
    return strip


def decode(data: bytes, **options: object) -> pyvips.Image:
    return pyvips.Image.new_from_buffer(data, "", **options)


def pixel(image: pyvips.Image, x: int, y: int) -> list[float]:
    return list(image(x, y))


def close(actual: Sequence[float], expected: Sequence[int], tolerance: int = 40) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=False))


def assert_quadrants(image: pyvips.Image, tolerance: int = 40) -> None:
    """The image shows :func:`quadrants` upright (sampled at each quadrant's centre)."""
    w, h = image.width, image.height
    expected = {
        (w // 4, h // 4): RED,
        (3 * w // 4, h // 4): GREEN,
        (w // 4, 3 * h // 4): BLUE,
        (3 * w // 4, 3 * h // 4): YELLOW,
    }
    got = {xy: pixel(image, *xy)[:3] for xy in expected}
    assert all(close(got[xy], rgb, tolerance) for xy, rgb in expected.items()), got
