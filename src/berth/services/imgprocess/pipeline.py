"""Running a :class:`Plan` on an image with pyvips.

Order, whatever order the parameters came in: load (shrinking on load when
the plan allows) -> sRGB -> auto-orient -> crop -> resize -> clip -> rotate ->
flip -> blur -> sharpen -> round corners -> border -> canvas -> watermarks ->
save. Animations are processed frame by frame and joined again, so every
geometric operation means the same on a GIF as on a JPEG.
"""

from __future__ import annotations

import hashlib
import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyvips

from berth.services.config import ImgProcessConfig
from berth.services.errors import BadRequest, InvalidParameter
from berth.services.imaging import (
    AVIF,
    GIF,
    JPEG,
    PNG,
    WEBP,
    Format,
    Probe,
    check_decodable,
    open_image,
    probe,
    time_limit,
    vips_errors,
    vips_message,
)
from berth.services.imgprocess import geometry, turbo_jpeg
from berth.services.imgprocess.negotiate import choose
from berth.services.imgprocess.params import FONTS, RGBA, Plan, Watermark
from berth.services.upload import Body

WatermarkLoader = Callable[[str], pyvips.Image]


@dataclass(frozen=True)
class Output:
    body: bytes
    format: Format
    width: int
    height: int  # of one frame
    frames: int
    vary_accept: bool


# --- colour -------------------------------------------------------------------------------


# Levels per channel of the colour cube a profile is tried on: 32768 colours.
_CUBE_LEVELS = 32
# Verdicts by profile digest (profiles can be hundreds of KB; digests are 16 bytes).
_srgb_verdicts: dict[bytes, bool] = {}
_SRGB_VERDICTS_KEPT = 256


def is_srgb_profile(profile: bytes) -> bool:
    """Whether converting 8-bit RGB from ``profile`` to sRGB moves no colour by more than 1.

    Photos exported for the web mostly carry an sRGB profile; converting them
    through it changes nothing, yet cost 3.9 ms per 750x500 thumbnail (twice the
    resize): libvips goes through float Lab. The answer is found once per
    distinct profile, on a colour cube, and kept. A profile libvips cannot
    convert from (broken, or for CMYK) is not sRGB here: to_srgb then meets the
    same error and handles it as before.
    """
    digest = hashlib.blake2b(profile, digest_size=16).digest()
    verdict = _srgb_verdicts.get(digest)
    if verdict is None:
        verdict = _converts_to_itself(profile)
        if len(_srgb_verdicts) >= _SRGB_VERDICTS_KEPT:
            _srgb_verdicts.clear()  # many distinct profiles: start over, each costs ~5 ms
        _srgb_verdicts[digest] = verdict
    return verdict


def _converts_to_itself(profile: bytes) -> bool:
    levels = _CUBE_LEVELS
    xyz = pyvips.Image.xyz(levels * levels, levels)
    step = 255 / (levels - 1)
    red = (xyz[0] % levels) * step
    green = (xyz[0] / levels).floor() * step
    blue = xyz[1] * step
    cube = red.bandjoin([green, blue]).cast("uchar").copy(interpretation="srgb")
    cube.set_type(pyvips.GValue.blob_type, "icc-profile-data", profile)
    try:
        out = cube.icc_transform("srgb", embedded=True, intent="perceptual")
        return bool(out.bands == 3 and (out.cast("int") - cube.cast("int")).abs().max() <= 1)
    except pyvips.Error:  # the conversion failed: keep it, and its error handling, in to_srgb
        return False


def to_srgb(image: pyvips.Image, honour_icc: bool) -> pyvips.Image:
    """8-bit sRGB (plus alpha), with the embedded profile applied unless told not to."""
    has_icc = image.get_typeof("icc-profile-data") != 0
    if (
        has_icc
        and honour_icc
        and image.format == "uchar"
        and image.interpretation == "srgb"
        and is_srgb_profile(image.get("icc-profile-data"))
    ):
        honour_icc = False  # the pixels are sRGB already
    if has_icc and honour_icc:
        try:
            image = image.icc_transform("srgb", embedded=True, intent="perceptual")
        except pyvips.Error:
            # A broken profile should not cost the user the image: browsers
            # ignore it too, and show the numbers as sRGB.
            pass
    if image.interpretation == "cmyk":
        # No profile: libvips' built-in CMYK profile is a better guess than raw numbers.
        image = image.icc_transform("srgb", input_profile="cmyk", intent="perceptual")
    if image.interpretation != "srgb" or image.format != "uchar":
        image = image.colourspace("srgb")
    if image.bands > 4:
        # TIFF extra samples: the first is the alpha; savers and fills expect RGB(A).
        image = image[:4]
    if image.format != "uchar":
        image = image.cast("uchar")
    if has_icc:
        # The pixels are sRGB now; the old profile would make viewers convert twice.
        image = image.copy()
        image.remove("icc-profile-data")
    return image


def fill(image: pyvips.Image, rgba: RGBA) -> list[float]:
    """A background value for ``image``'s bands from an RGBA colour."""
    return [float(v) for v in rgba] if image.hasalpha() else [float(v) for v in rgba[:3]]


def with_alpha(image: pyvips.Image) -> pyvips.Image:
    return image if image.hasalpha() else image.bandjoin(255)


def needs_alpha(rgba: RGBA) -> bool:
    return rgba[3] < 255


# --- operations on one frame --------------------------------------------------------------


def rounded_mask(width: int, height: int, radius: int) -> pyvips.Image:
    """Anti-aliased alpha mask of a rounded rectangle (signed distance, 1 px ramp)."""
    r = min(radius, width // 2, height // 2)
    xyz = pyvips.Image.xyz(width, height)
    x, y = xyz[0] + 0.5, xyz[1] + 0.5
    qx = (x - width / 2).abs() - (width / 2 - r)
    qy = (y - height / 2).abs() - (height / 2 - r)
    qx = (qx > 0).ifthenelse(qx, 0)
    qy = (qy > 0).ifthenelse(qy, 0)
    distance = (qx * qx + qy * qy) ** 0.5 - r
    alpha = (0.5 - distance) * 255
    return (alpha > 255).ifthenelse(255, (alpha < 0).ifthenelse(0, alpha)).cast("uchar")


def gaussblur(image: pyvips.Image, radius: int, sigma: int) -> pyvips.Image:
    # UPYUN gives a radius; libvips sizes the mask from min_ampl, the value of
    # the Gaussian at its edge, so pick the min_ampl that ends it at `radius`.
    min_ampl = 0.2
    if radius > 0:
        min_ampl = min(0.5, max(0.001, math.exp(-(radius**2) / (2 * sigma**2))))
    return image.gaussblur(sigma, min_ampl=min_ampl)


def text_overlay(wm: Watermark) -> pyvips.Image:
    family = FONTS[wm.font]
    # Pango markup is interpreted by libvips: escape so text is only text.
    try:
        mask = pyvips.Image.text(html.escape(wm.source), font=f"{family} {wm.size}", dpi=72)
    except pyvips.Error as exc:  # blank text: "no text to render"
        raise InvalidParameter("watermark/text", vips_message(exc)) from None
    pad = 2 if wm.border is not None else 0
    mask = mask.embed(pad, pad, mask.width + 2 * pad, mask.height + 2 * pad)
    r, g, b, a = wm.color
    layer = mask.new_from_image([r, g, b]).copy(interpretation="srgb")
    layer = layer.bandjoin((mask * (a / 255)).cast("uchar"))
    if wm.border is not None and wm.border[3] > 0:
        kernel = pyvips.Image.new_from_array([[255] * 5] * 5)
        outline_mask = mask.morph(kernel, "dilate")
        br, bg, bb, ba = wm.border
        outline = outline_mask.new_from_image([br, bg, bb]).copy(interpretation="srgb")
        outline = outline.bandjoin((outline_mask * (ba / 255)).cast("uchar"))
        layer = outline.composite2(layer, "over")
    return layer


def prepare_watermark(
    wm: Watermark, base_w: int, base_h: int, load: WatermarkLoader
) -> pyvips.Image:
    overlay = text_overlay(wm) if wm.kind == "text" else with_alpha(load(wm.source))
    if wm.kind == "image" and wm.percent > 0:
        factor = wm.percent / 100 * min(base_w, base_h) / min(overlay.width, overlay.height)
        overlay = overlay.resize(factor)
    if wm.opacity < 100:
        overlay = overlay[:-1].bandjoin((overlay[-1] * (wm.opacity / 100)).cast("uchar"))
    return overlay


def place_watermark(image: pyvips.Image, overlay: pyvips.Image, wm: Watermark) -> pyvips.Image:
    opaque = not image.hasalpha()
    mx, my = wm.margin
    if wm.repeat:
        tile = overlay.embed(0, 0, overlay.width + mx, overlay.height + my)
        across = image.width // tile.width + 1
        down = image.height // tile.height + 1
        overlay = tile.replicate(across, down).crop(0, 0, image.width, image.height)
        x = y = 0
    else:
        x, y = geometry.anchor(
            wm.align, (image.width, image.height), (overlay.width, overlay.height)
        )
        x += mx if wm.align.endswith("west") else -mx if wm.align.endswith("east") else 0
        y += my if wm.align.startswith("north") else -my if wm.align.startswith("south") else 0
    out = image.composite2(overlay, "over", x=x, y=y)
    return out[:3] if opaque else out


@dataclass
class FrameOps:
    """The geometric part of a plan, applied the same way to every frame."""

    plan: Plan
    config: ImgProcessConfig
    load_watermark: WatermarkLoader
    animated: bool
    frames: int
    # The source streams top to bottom: anything that reads it out of order
    # works on an in-memory copy of the (resized) image instead.
    sequential: bool = False
    watch: Callable[[pyvips.Image], pyvips.Image] = lambda image: image
    _overlays: list[pyvips.Image] | None = None

    def resize(self, image: pyvips.Image, target: geometry.Target) -> pyvips.Image:
        plan = self.plan
        geometry.check_output(
            target.width, target.height, self.config.limit_output_side, plan.resize_key
        )
        geometry.check_output_pixels(
            target.width, target.height, self.frames, self.config.limit_pixels, plan.resize_key
        )
        size = "force" if target.fit != "cover" else "both"
        crop = "centre" if target.fit == "cover" else "none"
        return image.thumbnail_image(
            target.width, height=target.height, size=size, crop=crop, no_rotate=True
        )

    def in_memory(self, image: pyvips.Image) -> pyvips.Image:
        return self.watch(image.copy_memory()) if self.sequential else image

    def apply(self, image: pyvips.Image, target: geometry.Target | None) -> pyvips.Image:
        plan = self.plan
        limit = self.config.limit_output_side
        if plan.crop is not None:
            left, top, w, h = geometry.region_box(plan.crop, image.width, image.height, "crop")
            image = image.extract_area(left, top, w, h)
            if plan.resize is not None:
                target = geometry.resize_target(plan.resize, plan.force, w, h)
        if target is not None:
            image = self.resize(image, target)
        if plan.clip is not None:
            left, top, w, h = geometry.region_box(plan.clip, image.width, image.height, "clip")
            image = image.extract_area(left, top, w, h)
        if plan.rotate is not None or plan.flip == "vertical":
            image = self.in_memory(image)
        if plan.rotate is not None:
            if plan.rotate % 90 == 0:
                image = image.rot(f"d{plan.rotate}")
            else:
                image = with_alpha(image).rotate(plan.rotate, background=[255, 255, 255, 0])
        if plan.flip is not None:
            image = image.flip(plan.flip)
        if plan.gaussblur is not None:
            image = gaussblur(image, *plan.gaussblur)
        if plan.unsharp:
            image = image.sharpen()
        if plan.roundrect is not None:
            mask = rounded_mask(image.width, image.height, plan.roundrect)
            if image.hasalpha():
                alpha = (image[-1] * mask / 255).cast("uchar")
                image = image[:-1].bandjoin(alpha)
            else:
                image = image.bandjoin(mask)
        if plan.border is not None:
            bw, bh = plan.border
            geometry.check_output(image.width + 2 * bw, image.height + 2 * bh, limit, "border")
            if needs_alpha(plan.brdcolor):
                image = with_alpha(image)
            image = image.embed(
                bw,
                bh,
                image.width + 2 * bw,
                image.height + 2 * bh,
                extend="background",
                background=fill(image, plan.brdcolor),
            )
        if plan.canvas is not None:
            c = plan.canvas
            x = (c.width - image.width) // 2 if c.x is None else c.x
            y = (c.height - image.height) // 2 if c.y is None else c.y
            if not (-image.width < x < c.width and -image.height < y < c.height):
                raise InvalidParameter(
                    "canvas",
                    f"offset {x},{y} puts the {image.width}x{image.height} image "
                    f"outside the {c.width}x{c.height} canvas",
                )
            if needs_alpha(plan.cvscolor):
                image = with_alpha(image)
            image = image.embed(
                x,
                y,
                c.width,
                c.height,
                extend="background",
                background=fill(image, plan.cvscolor),
            )
        for wm, overlay in zip(self.plan.watermarks, self._prepared(image), strict=True):
            if overlay is not None:
                image = place_watermark(image, overlay, wm)
        return image

    def _prepared(self, image: pyvips.Image) -> list[pyvips.Image | None]:
        # Frames share a size, so watermarks are rendered once per request.
        if self._overlays is None:
            self._overlays = [
                None
                if self.animated and not wm.animate
                else prepare_watermark(wm, image.width, image.height, self.load_watermark)
                for wm in self.plan.watermarks
            ]
        return self._overlays


# --- load, run, save ----------------------------------------------------------------------


def needs_random_access(plan: Plan, found: Probe, target: geometry.Target | None) -> bool:
    """Sequential decoding keeps memory flat, but only for top-to-bottom pipelines.

    Turning (EXIF orientation 3-8, rotate, a vertical flip) reads out of order.
    When a resize comes first, the turn is done on an in-memory copy of the
    small result, and the big source still streams; without one, or when a crop
    must see the image upright first, the source is decoded whole.
    """
    if found.frames > 1:
        return True
    upright = plan.autoorient and found.orientation >= 3
    turns = upright or plan.rotate is not None or plan.flip == "vertical"
    return turns and (target is None or (upright and plan.crop is not None))


def load(
    data: Body, found: Probe, plan: Plan, animated: bool
) -> tuple[pyvips.Image, geometry.Target | None]:
    """The decoded (lazy) image and the resize target, shrinking on load where possible."""
    oriented = plan.autoorient and not animated
    width, height = found.oriented_size if oriented else (found.width, found.height)
    target = None
    if plan.resize is not None and plan.crop is None:
        target = geometry.resize_target(plan.resize, plan.force, width, height)
    options: dict[str, Any] = {"fail_on": "truncated"}
    options["access"] = "random" if needs_random_access(plan, found, target) else "sequential"
    if animated:
        options["n"] = -1
    if target is not None and found.format is JPEG:
        shrink = geometry.jpeg_shrink(width, height, target)
        if shrink > 1 and plan.strip and not plan.exifswitch:
            fast = turbo_jpeg.decode_shrunk(data, found, shrink)
            if fast is not None:
                return fast, target
        if shrink > 1:
            options["shrink"] = shrink
    elif target is not None and found.format is WEBP:
        factor = max(target.width / width, target.height / height)
        if factor < 1:
            options["scale"] = factor
    return open_image(data, **options), target


def save(image: pyvips.Image, fmt: Format, plan: Plan, quality: int) -> bytes:
    if plan.exifswitch:
        keep = "exif"
    elif plan.strip:
        keep = "none"
    else:
        keep = "exif:xmp:iptc:other"
    q = plan.quality or quality
    if fmt is JPEG:
        if image.hasalpha():
            image = image.flatten(background=[255, 255, 255])
        return bytes(
            image.jpegsave_buffer(
                Q=q, interlace=plan.progressive, optimize_coding=plan.compress, keep=keep
            )
        )
    if fmt is PNG:
        compression = 9 if plan.compress else 6
        return bytes(
            image.pngsave_buffer(compression=compression, interlace=plan.progressive, keep=keep)
        )
    if fmt is WEBP:
        return bytes(image.webpsave_buffer(Q=q, lossless=plan.lossless, keep=keep))
    if fmt is AVIF:
        return bytes(
            image.heifsave_buffer(
                Q=q, lossless=plan.lossless, compression="av1", effort=2, keep=keep
            )
        )
    assert fmt is GIF
    return bytes(image.gifsave_buffer(keep=keep))


def process(
    data: Body,
    plan: Plan,
    accept: str | None,
    config: ImgProcessConfig,
    load_watermark: WatermarkLoader,
) -> Output:
    with vips_errors("cannot process image"):
        found = probe(data, config)
        check_decodable(found)
        animated_in = found.frames > 1 and found.format in (GIF, WEBP)
        has_alpha = bool(found.image.hasalpha())
        fmt, vary = choose(
            plan.format, accept, found.format, has_alpha, animated_in and plan.keeps_animation
        )
        animated = animated_in and plan.keeps_animation and fmt in (GIF, WEBP)
        image, target = load(data, found, plan, animated)
        with time_limit(config.timeout_processing, "cannot process image") as watch:
            image = to_srgb(watch(image), honour_icc=not plan.noicc)
            ops = FrameOps(
                plan,
                config,
                load_watermark,
                animated,
                found.frames if animated else 1,
                sequential=not needs_random_access(plan, found, target),
                watch=watch,
            )
            # Orientation 1 needs no turn (every libvips call also costs GIL round trips).
            if plan.autoorient and not animated and found.orientation != 1:
                if ops.sequential and target is not None and found.orientation >= 3:
                    # Resize as stored, then turn the small result upright.
                    stored = geometry.stored_target(target, found.orientation)
                    image, target = ops.in_memory(ops.resize(image, stored)), None
                image = image.autorot()
            if animated:
                # Shrink-on-load (WebP) has scaled the frames already.
                page = image.get("page-height") if image.get_typeof("page-height") else found.height
                frames = [image.crop(0, i * page, image.width, page) for i in range(found.frames)]
                done = [ops.apply(frame, target) for frame in frames]
                image = pyvips.Image.arrayjoin(done, across=1).copy()
                image.set_type(pyvips.GValue.gint_type, "page-height", done[0].height)
                out_height, out_frames = done[0].height, len(done)
            else:
                image = ops.apply(image, target)
                out_height, out_frames = image.height, 1
            geometry.check_output(image.width, out_height, config.limit_output_side, "result")
            geometry.check_output_pixels(
                image.width, out_height, out_frames, config.limit_pixels, "result"
            )
            body = save(image, fmt, plan, config.quality_default)
    return Output(body, fmt, image.width, out_height, out_frames, vary)


def check_watermark_path(path: str) -> str:
    """A watermark path relative to the watermark directory; no escaping it."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    # A NUL makes the OS call raise ValueError; no file name needs control characters.
    if not parts or any(p == ".." for p in parts) or any(ord(c) < 32 for c in path):
        raise BadRequest(f"watermark url {path!r} is not a path inside the watermark directory")
    return "/".join(parts)
