"""Choosing the output format: explicit ``/format/x``, ``auto`` from Accept, or the input's."""

from __future__ import annotations

from berth.services.imaging import AVIF, GIF, JPEG, PNG, WEBP, Format
from berth.services.imgprocess.params import OutputFormat

OUTPUTS: dict[str, Format] = {f.name: f for f in (JPEG, PNG, WEBP, AVIF, GIF)}


def accepted(accept: str | None) -> set[str]:
    """Media types named explicitly with q > 0.

    Wildcards do not count: ``*/*`` from curl or an old client says nothing about
    AVIF support, which is why imgproxy and imaginary only trust explicit types.
    """
    types: set[str] = set()
    for item in (accept or "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if media and "*" not in media and q > 0:
            types.add(media.lower())
    return types


def default_output(source: Format, has_alpha: bool) -> Format:
    if source.name in OUTPUTS:
        return OUTPUTS[source.name]
    # TIFF, HEIC: browsers cannot show them, so answer in a web format.
    return PNG if has_alpha else JPEG


def choose(
    requested: OutputFormat | None,
    accept: str | None,
    source: Format,
    has_alpha: bool,
    animated: bool,
) -> tuple[Format, bool]:
    """The output format and whether the answer depends on Accept (then send Vary)."""
    if requested is None:
        return default_output(source, has_alpha), False
    if requested != "auto":
        return OUTPUTS[requested], False
    types = accepted(accept)
    # libvips writes AVIF one frame only; an animation goes to WebP or stays GIF.
    if "image/avif" in types and not animated:
        return AVIF, True
    if "image/webp" in types:
        return WEBP, True
    return default_output(source, has_alpha), True
