"""The UPYUN-style processing parameters: ``/fw/300/quality/80/format/webp``.

Parsing is pure and strict: an unknown key or a bad value is an
:class:`InvalidParameter` naming the key, and nothing is processed. Keys are
order-insensitive and the last occurrence of a key wins, as on UPYUN; the
operations then run in the fixed order of :mod:`pipeline`. Watermark groups
are the exception to "order-insensitive": the keys after ``watermark/...``
(align, margin, opacity, ...) belong to that watermark.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from berth.services.errors import InvalidParameter

Gravity = Literal[
    "northwest", "north", "northeast", "west", "center", "east", "southwest", "south", "southeast"
]
GRAVITIES: tuple[Gravity, ...] = (
    "northwest",
    "north",
    "northeast",
    "west",
    "center",
    "east",
    "southwest",
    "south",
    "southeast",
)
OutputFormat = Literal["jpg", "png", "webp", "avif", "gif", "auto"]
ResizeMode = Literal[
    "fw", "fh", "fwfh", "fwfh2", "both", "sq", "max", "min", "scale", "wscale", "hscale", "fp"
]
RGBA = tuple[int, int, int, int]

# UPYUN's fonts, mapped to fontconfig families that resolve on any Linux.
FONTS: dict[str, str] = {
    "simsun": "serif",
    "simhei": "sans",
    "simkai": "serif",
    "simli": "serif",
    "simyou": "sans",
    "simfang": "serif",
    "sc": "sans",
    "tc": "sans",
    "arial": "sans",
    "georgia": "serif",
    "helvetica": "sans",
    "roman": "serif",
}

MAX_SIDE_PARAM = 20_000
MAX_TEXT = 500
MAX_TEXT_PIXELS = 16_000_000
# Each watermark is one more composite in the pipeline; thousands ran for minutes.
MAX_WATERMARKS = 10


@dataclass(frozen=True)
class Resize:
    mode: ResizeMode
    width: int = 0  # or the single value of fw, max, sq, scale, fp, ...
    height: int = 0


@dataclass(frozen=True)
class Region:
    """``crop``/``clip`` region: size (0 = to the edge) and offset from the gravity anchor."""

    width: int
    height: int
    x: int = 0
    y: int = 0
    gravity: Gravity = "northwest"


@dataclass(frozen=True)
class Canvas:
    width: int
    height: int
    x: int | None = None  # None: centred
    y: int | None = None


@dataclass(frozen=True)
class Watermark:
    kind: Literal["image", "text"]
    source: str  # decoded path of the image, or the text
    align: Gravity = "northwest"
    margin: tuple[int, int] = (20, 20)
    opacity: int = 100
    percent: int = 0
    repeat: bool = False
    animate: bool = False
    size: int = 32
    font: str = "simsun"
    color: RGBA = (0, 0, 0, 255)
    border: RGBA | None = None


@dataclass(frozen=True)
class Plan:
    resize: Resize | None = None
    force: bool = False
    crop: Region | None = None
    clip: Region | None = None
    autoorient: bool = True
    rotate: int | None = None  # degrees clockwise, (0, 360)
    flip: Literal["horizontal", "vertical"] | None = None
    gaussblur: tuple[int, int] | None = None  # radius, sigma
    unsharp: bool = False
    border: tuple[int, int] | None = None
    brdcolor: RGBA = (0, 0, 0, 255)
    canvas: Canvas | None = None
    cvscolor: RGBA = (255, 255, 255, 255)
    roundrect: int | None = None
    watermarks: tuple[Watermark, ...] = ()
    format: OutputFormat | None = None
    quality: int | None = None
    lossless: bool = False
    progressive: bool = False
    compress: bool = False
    strip: bool = True
    noicc: bool = False
    exifswitch: bool = False
    gifto: bool = False

    @property
    def keeps_animation(self) -> bool:
        return not self.gifto

    @property
    def resize_key(self) -> str:
        return self.resize.mode if self.resize is not None else "resize"


# --- value parsers: each raises InvalidParameter(key, ...) --------------------------------


def _int(key: str, value: str, low: int, high: int) -> int:
    if not re.fullmatch(r"\d{1,9}", value):
        raise InvalidParameter(key, f"{value!r} is not a whole number")
    number = int(value)
    if not low <= number <= high:
        raise InvalidParameter(key, f"{number} is out of range [{low}, {high}]")
    return number


def _bool(key: str, value: str) -> bool:
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise InvalidParameter(key, f"{value!r} is not true or false")


def _size(key: str, value: str, low: int = 1) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", value)
    if match is None:
        raise InvalidParameter(key, f"{value!r} is not WIDTHxHEIGHT")
    w, h = int(match[1]), int(match[2])
    for n in (w, h):
        if not low <= n <= MAX_SIDE_PARAM:
            raise InvalidParameter(key, f"{n} is out of range [{low}, {MAX_SIDE_PARAM}]")
    return w, h


_OFFSET = r"([as])(\d{1,6})"


def _offset(sign: str, number: str) -> int:
    return int(number) if sign == "a" else -int(number)


def _box(key: str, value: str, low: int) -> tuple[int, int, int | None, int | None]:
    """``WIDTHxHEIGHT[aXaY]`` of crop, clip and canvas; offsets are None when absent."""
    match = re.fullmatch(rf"(\d{{1,6}})x(\d{{1,6}})(?:{_OFFSET}{_OFFSET})?", value)
    if match is None:
        raise InvalidParameter(key, f"{value!r} is not WIDTHxHEIGHT[aXaY] (a=+, s=-)")
    w, h = int(match[1]), int(match[2])
    for n in (w, h):
        if not low <= n <= MAX_SIDE_PARAM:
            raise InvalidParameter(key, f"{n} is out of range [{low}, {MAX_SIDE_PARAM}]")
    if not match[3]:
        return w, h, None, None
    return w, h, _offset(match[3], match[4]), _offset(match[5], match[6])


def _region(key: str, value: str) -> Region:
    w, h, x, y = _box(key, value, low=0)  # 0 = to the edge
    return Region(w, h, x or 0, y or 0)


def _canvas(key: str, value: str) -> Canvas:
    return Canvas(*_box(key, value, low=1))


def color(key: str, value: str) -> RGBA:
    """RRGGBB or RRGGBBAA; UPYUN's alpha is inverted (00 opaque, FF transparent)."""
    if not re.fullmatch(r"[0-9A-Fa-f]{6}(?:[0-9A-Fa-f]{2})?", value):
        raise InvalidParameter(key, f"{value!r} is not a colour RRGGBB or RRGGBBAA")
    r, g, b = (int(value[i : i + 2], 16) for i in (0, 2, 4))
    transparency = int(value[6:8], 16) if len(value) == 8 else 0
    return r, g, b, 255 - transparency


def _gravity(key: str, value: str) -> Gravity:
    for gravity in GRAVITIES:
        if value == gravity:
            return gravity
    raise InvalidParameter(key, f"{value!r} is not one of {', '.join(GRAVITIES)}")


def decode_b64(key: str, value: str) -> str:
    """UPYUN's base64 with '/' written as '|' (URL-safe '-' '_' accepted too)."""
    text = value.replace("|", "/").replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        decoded = base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidParameter(key, f"{value!r} is not base64 of UTF-8 text") from None
    if not decoded:
        raise InvalidParameter(key, "is empty")
    return decoded


def encode_b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode().replace("/", "|")


# --- the parser ---------------------------------------------------------------------------

_RESIZE_KEYS: tuple[ResizeMode, ...] = (
    "fw", "fh", "fwfh", "fwfh2", "both", "sq", "max", "min", "scale", "wscale", "hscale", "fp"
)  # fmt: skip
_FORMATS: dict[str, OutputFormat] = {
    "jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp", "avif": "avif", "gif": "gif",
    "auto": "auto",
}  # fmt: skip
_WATERMARK_KEYS = {
    "align", "margin", "opacity", "percent", "repeat", "animate", "size", "font", "color", "border"
}  # fmt: skip


def _resize(key: ResizeMode, value: str) -> Resize:
    if key in ("fwfh", "fwfh2", "both"):
        w, h = _size(key, value)
        return Resize(key, w, h)
    if key in ("scale", "wscale", "hscale"):
        return Resize(key, _int(key, value, 1, 1000))
    if key == "fp":
        return Resize(key, _int(key, value, 1, 25_000_000))
    return Resize(key, _int(key, value, 1, MAX_SIDE_PARAM))


def _merge_resize(old: Resize | None, new: Resize) -> Resize:
    if old is None or old.mode == new.mode:
        return new
    # `/fw/300/fh/200` is the natural way to say "fit in 300x200".
    pair = {old.mode, new.mode}
    if pair == {"fw", "fh"}:
        w = old.width if old.mode == "fw" else new.width
        h = old.width if old.mode == "fh" else new.width
        return Resize("fwfh", w, h)
    if old.mode == "fwfh" and new.mode in ("fw", "fh"):
        w = new.width if new.mode == "fw" else old.width
        h = new.width if new.mode == "fh" else old.height
        return Resize("fwfh", w, h)
    raise InvalidParameter(new.mode, f"conflicts with {old.mode}: give one resize")


def _watermark_option(wm: Watermark, key: str, value: str) -> Watermark:
    if key == "align":
        return replace(wm, align=_gravity(key, value))
    if key == "margin":
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value)
        if match is None:
            raise InvalidParameter(key, f"{value!r} is not XxY")
        return replace(wm, margin=(int(match[1]), int(match[2])))
    if key == "opacity":
        return replace(wm, opacity=_int(key, value, 0, 100))
    if key == "percent":
        return replace(wm, percent=_int(key, value, 0, 100))
    if key == "repeat":
        return replace(wm, repeat=_bool(key, value))
    if key == "animate":
        return replace(wm, animate=_bool(key, value))
    if wm.kind == "image":
        raise InvalidParameter(key, "applies to text watermarks only")
    if key == "size":
        return replace(wm, size=_int(key, value, 1, 1000))
    if key == "font":
        if value not in FONTS:
            raise InvalidParameter(key, f"{value!r} is not one of {', '.join(FONTS)}")
        return replace(wm, font=value)
    if key == "color":
        return replace(wm, color=color(key, value))
    assert key == "border"
    return replace(wm, border=color(key, value))


_FLAGS = ("force", "lossless", "progressive", "compress", "strip", "noicc", "exifswitch", "gifto")


def _kw(key: str, value: object) -> dict[str, Any]:
    # Plan fields set by key name; the key was checked against the known names first.
    return {key: value}


def split_path(path: str) -> list[tuple[str, str]]:
    """``/fw/300/format/webp`` -> [("fw", "300"), ("format", "webp")].

    ``watermark`` is the one key with two values (``/watermark/text/<b64>``);
    it becomes the pair ("watermark/text", "<b64>").
    """
    parts = path.strip().strip("/").split("/")
    if parts == [""]:
        return []
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(parts):
        key = parts[i]
        if key == "watermark":
            if i + 2 >= len(parts):
                raise InvalidParameter(key, "needs url/<base64> or text/<base64>")
            kind = parts[i + 1]
            if kind not in ("url", "text"):
                raise InvalidParameter(key, f"{kind!r} is not url or text")
            pairs.append((f"watermark/{kind}", parts[i + 2]))
            i += 3
            continue
        if i + 1 >= len(parts):
            raise InvalidParameter(key or "path", "has no value (parameters are /key/value)")
        pairs.append((key, parts[i + 1]))
        i += 2
    return pairs


def parse(path: str) -> Plan:
    return parse_pairs(split_path(path))


def parse_pairs(pairs: list[tuple[str, str]]) -> Plan:
    plan = Plan()
    watermarks: list[Watermark] = []
    # The region that a following `gravity` applies to.
    last_region: Literal["crop", "clip"] | None = None
    in_watermark = False
    for key, value in pairs:
        if in_watermark and key in _WATERMARK_KEYS:
            watermarks[-1] = _watermark_option(watermarks[-1], key, value)
            continue
        in_watermark = False
        if key != "gravity":
            last_region = None
        if key in _RESIZE_KEYS:
            resize = _resize(key, value)
            plan = replace(plan, resize=_merge_resize(plan.resize, resize))
        elif key in ("crop", "clip"):
            plan = replace(plan, **_kw(key, _region(key, value)))
            last_region = "crop" if key == "crop" else "clip"
        elif key == "gravity":
            if last_region is None:
                raise InvalidParameter(key, "must follow crop or clip")
            region = getattr(plan, last_region)
            plan = replace(plan, **_kw(last_region, replace(region, gravity=_gravity(key, value))))
        elif key == "rotate":
            if value == "auto":
                plan = replace(plan, autoorient=True, rotate=None)
            else:
                angle = _int(key, value, 0, 360) % 360
                plan = replace(plan, rotate=angle or None)
        elif key == "autoorient":
            plan = replace(plan, autoorient=_bool(key, value))
        elif key == "flip":
            if value in ("left,right", "left-right"):
                plan = replace(plan, flip="horizontal")
            elif value in ("top,down", "top-down"):
                plan = replace(plan, flip="vertical")
            else:
                raise InvalidParameter(key, f"{value!r} is not left,right or top,down")
        elif key == "gaussblur":
            match = re.fullmatch(r"(\d{1,2})x(\d{1,2})", value)
            if match is None:
                raise InvalidParameter(key, f"{value!r} is not RADIUSxSIGMA")
            radius, sigma = int(match[1]), int(match[2])
            if radius > 50 or not 1 <= sigma <= 50:
                raise InvalidParameter(key, "radius must be in [0, 50] and sigma in [1, 50]")
            plan = replace(plan, gaussblur=(radius, sigma))
        elif key == "unsharp":
            plan = replace(plan, unsharp=_bool(key, value))
        elif key == "border":
            plan = replace(plan, border=_size(key, value, low=0))
        elif key == "brdcolor":
            plan = replace(plan, brdcolor=color(key, value))
        elif key == "canvas":
            plan = replace(plan, canvas=_canvas(key, value))
        elif key == "cvscolor":
            plan = replace(plan, cvscolor=color(key, value))
        elif key == "roundrect":
            plan = replace(plan, roundrect=_int(key, value, 1, MAX_SIDE_PARAM))
        elif key in ("watermark/url", "watermark/text"):
            kind: Literal["image", "text"] = "image" if key == "watermark/url" else "text"
            if len(watermarks) == MAX_WATERMARKS:
                raise InvalidParameter("watermark", f"at most {MAX_WATERMARKS} watermarks")
            watermarks.append(_watermark_source(Watermark(kind, ""), key, value))
            in_watermark = True
        elif key == "format":
            if value not in _FORMATS:
                raise InvalidParameter(key, f"{value!r} is not one of {', '.join(_FORMATS)}")
            plan = replace(plan, format=_FORMATS[value])
        elif key == "quality":
            plan = replace(plan, quality=_int(key, value, 1, 100))
        elif key in _FLAGS:
            plan = replace(plan, **_kw(key, _bool(key, value)))
        else:
            raise InvalidParameter(key, "unknown parameter")
    for wm in watermarks:
        # libvips renders text into memory at once: bound its area up front.
        if wm.kind == "text" and 0.75 * wm.size * wm.size * len(wm.source) > MAX_TEXT_PIXELS:
            raise InvalidParameter(
                "size", f"text of {len(wm.source)} characters at {wm.size} is too large"
            )
    return replace(plan, watermarks=tuple(watermarks))


def _watermark_source(wm: Watermark, key: str, value: str) -> Watermark:
    source = decode_b64(key, value)
    if wm.kind == "text" and len(source) > MAX_TEXT:
        raise InvalidParameter(key, f"text is longer than {MAX_TEXT} characters")
    return replace(wm, source=source)
