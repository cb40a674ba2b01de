"""Decoding the EXIF tags libvips exposes as strings into JSON values.

libvips gives each tag as ``"<raw> (<readable>, <Type>, <n> components, <m> bytes)"``,
e.g. ``"28/10 (f/2.8, Rational, 1 components, 8 bytes)"``. We keep numbers as
numbers and text as text; parsing the EXIF blob again with another library
would duplicate what libvips already did.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_TAG = re.compile(
    r"^(?P<raw>.*?) \((?P<readable>.*), (?P<type>[A-Za-z ]+), \d+ components?, \d+ bytes?\)$",
    re.DOTALL,
)

# libvips field name -> key in the JSON answer; the tags people look for.
COMMON_TAGS: dict[str, str] = {
    "exif-ifd0-Make": "Make",
    "exif-ifd0-Model": "Model",
    "exif-ifd0-Orientation": "Orientation",
    "exif-ifd0-DateTime": "DateTime",
    "exif-ifd0-Software": "Software",
    "exif-ifd0-Artist": "Artist",
    "exif-ifd0-Copyright": "Copyright",
    "exif-ifd0-ImageDescription": "ImageDescription",
    "exif-ifd2-DateTimeOriginal": "DateTimeOriginal",
    "exif-ifd2-DateTimeDigitized": "DateTimeDigitized",
    "exif-ifd2-ExposureTime": "ExposureTime",
    "exif-ifd2-FNumber": "FNumber",
    "exif-ifd2-ISOSpeedRatings": "ISOSpeedRatings",
    "exif-ifd2-PhotographicSensitivity": "ISOSpeedRatings",
    "exif-ifd2-FocalLength": "FocalLength",
    "exif-ifd2-LensModel": "LensModel",
    "exif-ifd2-Flash": "Flash",
    "exif-ifd2-ExposureProgram": "ExposureProgram",
    "exif-ifd2-WhiteBalance": "WhiteBalance",
    "exif-ifd2-PixelXDimension": "PixelXDimension",
    "exif-ifd2-PixelYDimension": "PixelYDimension",
    "exif-ifd3-GPSLatitudeRef": "GPSLatitudeRef",
    "exif-ifd3-GPSLatitude": "GPSLatitude",
    "exif-ifd3-GPSLongitudeRef": "GPSLongitudeRef",
    "exif-ifd3-GPSLongitude": "GPSLongitude",
    "exif-ifd3-GPSAltitude": "GPSAltitude",
}

ExifValue = str | int | float | list[int] | list[float]


def _rational(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den and float(den) != 0 else float(num)


def _numbers(raw: str, convert: Callable[[str], float]) -> ExifValue:
    values = [convert(part) for part in raw.split()]
    if len(values) == 1:
        return values[0]
    return values


def decode_tag(value: str) -> ExifValue:
    match = _TAG.match(value)
    if match is None:
        return value.strip()
    raw, readable, kind = match["raw"].strip(), match["readable"].strip(), match["type"]
    try:
        if kind in ("Short", "Long", "SShort", "SLong", "Byte", "SByte"):
            return _numbers(raw, int)
        if kind in ("Rational", "SRational", "Float", "Double"):
            return _numbers(raw, _rational)
    except ValueError:
        return readable
    if kind == "ASCII":
        return raw
    # Undefined and the rest: libvips' readable form ("Flash did not fire", "0230").
    return readable


def decode_common(fields: dict[str, str]) -> dict[str, ExifValue]:
    out: dict[str, ExifValue] = {}
    for name, key in COMMON_TAGS.items():
        if name in fields:
            out[key] = decode_tag(fields[name])
    return out
