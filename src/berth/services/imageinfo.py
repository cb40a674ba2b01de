"""imageinfo: upload an image, get its metadata as JSON (and UPYUN's x-upyun-* headers).

Only the header is read, never the pixels, so a 24 MP JPEG costs about as
much as a thumbnail; the limits still apply, as for every upload.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from berth.services.config import ImageInfoConfig
from berth.services.exif import decode_common
from berth.services.imaging import JPEG, PNG, Probe, init_vips, probe, vips_errors
from berth.services.shell import ServiceShell
from berth.services.upload import Body

NAME = "imageinfo"


def describe(probe: Probe, file_size: int) -> dict[str, Any]:
    image = probe.image
    fields = set(image.get_fields())
    progressive = None
    if probe.format in (JPEG, PNG):
        progressive = bool(image.get("interlaced")) if "interlaced" in fields else False
    exif_fields = {f: str(image.get(f)) for f in fields if f.startswith("exif-ifd")}
    display_width, display_height = probe.oriented_size
    return {
        "width": probe.width,
        "height": probe.height,
        "display_width": display_width,
        "display_height": display_height,
        "format": probe.format.name,
        "mime": probe.format.mime,
        "frames": probe.frames,
        "orientation": probe.orientation,
        "has_alpha": bool(image.hasalpha()),
        "bands": image.bands,
        "colorspace": str(image.interpretation),
        "has_icc_profile": "icc-profile-data" in fields,
        "file_size": file_size,
        "progressive": progressive,
        "exif": decode_common(exif_fields),
    }


def upyun_headers(info: dict[str, Any], file_type: str) -> dict[str, str]:
    return {
        "x-upyun-width": str(info["width"]),
        "x-upyun-height": str(info["height"]),
        "x-upyun-frames": str(info["frames"]),
        "x-upyun-file-type": file_type,
    }


class ImageInfoService:
    def __init__(self, config: ImageInfoConfig) -> None:
        init_vips()
        self.config = config
        self.shell = ServiceShell(NAME, config)

    def __repr__(self) -> str:
        return f"<ImageInfoService {self.shell!r}>"

    def _info(self, data: Body) -> tuple[dict[str, Any], str]:
        with vips_errors("cannot read image"):
            found = probe(data, self.config)
            return describe(found, len(data)), found.format.upyun

    async def info(self, request: Request) -> Response:
        async with self.shell.admit() as place:
            upload = await self.shell.read(request)
            info, file_type = await self.shell.work(place, lambda: self._info(upload.data))
        return JSONResponse(info, headers=upyun_headers(info, file_type))

    def app(self) -> Starlette:
        handler = self.shell.endpoint(self.info)
        # Any path: `curl -T cat.jpg host/` uploads to /cat.jpg.
        return self.shell.app([Route("/{path:path}", handler, methods=["PUT", "POST"])])
