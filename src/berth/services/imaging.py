"""The boundary to libvips shared by both services: which inputs we accept, how
they are opened safely, and how libvips errors become berth errors.

Only the loaders listed in ``LOADERS`` are used; anything else libvips could
open (CSV, matrix, raw .vips files...) is "not an image" to us. SVG is refused
too: libvips marks its SVG loader untrusted, and VIPS_BLOCK_UNTRUSTED is on.
Headers are read first and checked against the limits, so a decompression
bomb is refused before a single pixel is decoded.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Must be set before libvips starts: a loader marked untrusted can never run.
os.environ.setdefault("VIPS_BLOCK_UNTRUSTED", "1")

import pyvips

from berth.services.config import ServiceConfig
from berth.services.errors import (
    CorruptImage,
    ImageTooLarge,
    NotAnImage,
    ProcessingTimeout,
    ServiceError,
)
from berth.services.upload import Body


@dataclass(frozen=True)
class Format:
    name: str  # our name, as in `/format/<name>`
    mime: str
    upyun: str  # x-upyun-file-type


JPEG = Format("jpg", "image/jpeg", "JPEG")
PNG = Format("png", "image/png", "PNG")
WEBP = Format("webp", "image/webp", "WEBP")
GIF = Format("gif", "image/gif", "GIF")
AVIF = Format("avif", "image/avif", "AVIF")
HEIC = Format("heic", "image/heic", "HEIC")
TIFF = Format("tiff", "image/tiff", "TIFF")

LOADERS: dict[str, Format] = {
    "VipsForeignLoadJpegBuffer": JPEG,
    "VipsForeignLoadPngBuffer": PNG,
    "VipsForeignLoadWebpBuffer": WEBP,
    "VipsForeignLoadNsgifBuffer": GIF,
    "VipsForeignLoadHeifBuffer": AVIF,  # refined to HEIC from heif-compression
    "VipsForeignLoadTiffBuffer": TIFF,
}
# Formats whose loader can give all frames with n=-1.
MULTI_PAGE = {GIF, WEBP, TIFF, AVIF, HEIC}


def init_vips(concurrency: int = 1) -> None:
    """Process-wide libvips settings for a server of untrusted uploads."""
    pyvips.block_untrusted_set(True)
    # pyvips routes every libvips message, info included, through a Python
    # callback: ~10 per thumbnail, each taking the GIL from inside libvips
    # while other requests want it. Without it GLib's default handler prints
    # warnings and errors to stderr and drops info and debug.
    remove_handler = getattr(pyvips, "_remove_log_handler", None)
    if remove_handler is not None:
        remove_handler()
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    # Every upload is new: the operation cache would only hold memory.
    pyvips.cache_set_max(0)
    # One libvips thread per request: the pool already keeps every core busy,
    # and fewer threads per image measured faster on a 2-core machine.
    pyvips.concurrency_set(concurrency)


def find_loader(data: Body) -> Format:
    name_ptr = pyvips.vips_lib.vips_foreign_find_load_buffer(
        pyvips.ffi.from_buffer(data), len(data)
    )
    if name_ptr == pyvips.ffi.NULL:
        # libvips left "not a known format" in its per-thread error buffer.
        pyvips.vips_lib.vips_error_clear()
        raise NotAnImage("body is not an image in a supported format")
    name = pyvips.ffi.string(name_ptr).decode()
    fmt = LOADERS.get(name)
    if fmt is None:
        raise NotAnImage(f"{name.removeprefix('VipsForeignLoad')} input is not supported")
    return fmt


def open_image(data: Body, **options: Any) -> pyvips.Image:
    """An image decoded (lazily) from ``data``, which the caller keeps alive while it is used.

    ``Image.new_from_buffer`` first copies the whole buffer into memory libvips
    can own (4 MB per 24 MP upload, every request); a memory source reads it
    in place. libvips' buffer loaders read through such a source too.
    """
    source = pyvips.Source.new_from_memory(data)
    return pyvips.Image.new_from_source(source, "", **options)


_NOISE = re.compile(r"^(unable to call|VipsForeignLoad\w*: )", re.IGNORECASE)


def vips_message(exc: pyvips.Error) -> str:
    """The useful line of a libvips error: the cause, not 'unable to call ...'."""
    text = f"{exc.message}\n{exc.detail or ''}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    useful = [ln for ln in lines if not _NOISE.match(ln)]
    return (useful or lines or ["libvips error"])[-1][:300]


@contextmanager
def vips_errors(what: str) -> Iterator[None]:
    """Translate libvips failures inside the block; berth's own errors pass through."""
    try:
        yield
    except ServiceError:
        raise
    except pyvips.Error as exc:
        raise CorruptImage(f"{what}: {vips_message(exc)}") from None


@dataclass(frozen=True)
class Probe:
    """What the header says, checked against the limits; nothing is decoded yet."""

    format: Format
    image: pyvips.Image  # header-only, first frame
    width: int
    height: int  # of one frame
    frames: int
    orientation: int

    @property
    def oriented_size(self) -> tuple[int, int]:
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height


def _get(image: pyvips.Image, name: str, default: Any) -> Any:
    return image.get(name) if image.get_typeof(name) != 0 else default


def probe(data: Body, config: ServiceConfig) -> Probe:
    fmt = find_loader(data)
    with vips_errors("cannot read image header"):
        image = open_image(data, access="sequential", fail_on="truncated")
        width, height = image.width, image.height
        frames = int(_get(image, "n-pages", 1)) if fmt in MULTI_PAGE else 1
        page_height = int(_get(image, "page-height", height))
        if page_height > 0 and height % page_height == 0 and height > page_height:
            frames, height = height // page_height, page_height
        orientation = int(_get(image, "orientation", 1))
        if fmt is AVIF and _get(image, "heif-compression", "av1") == "hevc":
            fmt = HEIC
    check_limits(width, height, frames, config)
    return Probe(fmt, image, width, height, frames, orientation if 1 <= orientation <= 8 else 1)


# Whether this libvips decodes HEVC: None until the first HEIC upload tells.
_hevc_decodes: bool | None = None


def check_decodable(found: Probe) -> None:
    """415 for an image whose header libvips reads but whose pixels it cannot decode.

    pyvips-binary's libheif decodes AV1 (AVIF) but has no HEVC decoder
    (libde265), so a HEIC's header loads and its pixels do not. The first HEIC
    decides, by decoding one pixel, so a libvips built with HEVC support is used
    as it is. Only processing needs this: imageinfo describes HEIC from the header.
    """
    global _hevc_decodes
    if found.format is not HEIC or _hevc_decodes:
        return
    if _hevc_decodes is None:
        try:
            found.image.crop(0, 0, 1, 1).avg()
        except pyvips.Error as exc:
            if "HEVC" not in f"{exc.message} {exc.detail}":
                raise CorruptImage(f"cannot read image: {vips_message(exc)}") from None
            _hevc_decodes = False
        else:
            _hevc_decodes = True
            return
    raise NotAnImage(
        "HEIC (HEVC) images are not supported: this libvips has no HEVC decoder; "
        "send JPEG, PNG, WebP, AVIF, GIF or TIFF"
    )


def check_limits(width: int, height: int, frames: int, config: ServiceConfig) -> None:
    if width > config.limit_width or height > config.limit_height:
        raise ImageTooLarge(
            f"image is {width}x{height}, over the limit of "
            f"{config.limit_width}x{config.limit_height}"
        )
    if frames > config.limit_frames:
        raise ImageTooLarge(f"image has {frames} frames, over the limit of {config.limit_frames}")
    pixels = width * height * frames
    if pixels > config.limit_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height}x{frames} frames = {pixels} pixels, "
            f"over the limit of {config.limit_pixels}"
        )


class Watchdog:
    """One thread that calls callbacks at their deadlines, unless cancelled first.

    A ``threading.Timer`` per request cost a thread start each time, and the
    request waited until the new thread had been scheduled: on a loaded 2-core
    machine that was a tenth of a small thumbnail's time.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        # [deadline, sequence, callback]; a cancelled entry has callback None
        # (so it no longer holds the image) and is dropped when it comes up.
        self._heap: list[list[Any]] = []
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        with self._cond:
            armed = sum(1 for entry in self._heap if entry[2] is not None)
        return f"<Watchdog armed={armed} running={self._thread is not None}>"

    def arm(self, seconds: float, callback: Callable[[], None]) -> list[Any]:
        entry = [time.monotonic() + seconds, next(self._sequence), callback]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
                self._thread.start()
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    def cancel(self, entry: list[Any]) -> None:
        with self._cond:
            entry[2] = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                callback = heapq.heappop(self._heap)[2]
            try:
                callback()
            except Exception:  # one failing callback must not stop the others
                logging.getLogger("berth.services").exception("watchdog callback failed")


_watchdog = Watchdog()


@contextmanager
def time_limit(seconds: float, what: str) -> Iterator[Callable[[pyvips.Image], pyvips.Image]]:
    """Stop libvips' work inside the block once ``seconds`` have passed.

    Yields ``watch``: pass it the source image, and any in-memory copy made on
    the way. libvips checks an image's kill flag whenever a region of it is
    computed, so every evaluation that reads a watched image stops once the
    watchdog sets the flags. An "eval" progress callback would do the same from
    inside libvips, but it calls into Python (taking the GIL) for every tile:
    ~1 ms of a 24 MP thumbnail, more under load. The failure is recognised by
    our own flag, not by libvips' message: some savers (PNG) report a killed
    evaluation as "unable to write to target".
    """
    killed = threading.Event()
    watched: list[pyvips.Image] = []

    def kill() -> None:
        killed.set()
        for image in list(watched):
            image.set_kill(True)

    def watch(image: pyvips.Image) -> pyvips.Image:
        watched.append(image)
        if killed.is_set():
            image.set_kill(True)
        return image

    entry = _watchdog.arm(seconds, kill)
    try:
        yield watch
    except pyvips.Error:
        if killed.is_set():
            raise ProcessingTimeout(f"{what}: processing time limit reached") from None
        raise
    finally:
        _watchdog.cancel(entry)
