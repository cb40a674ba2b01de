"""imgprocess over HTTP: ``PUT /cat.jpg!/fw/300/format/webp``, the same string in
``x-gmkerl-thumb``, or ``POST /pipeline`` with a JSON list of operations."""

from __future__ import annotations

import json
from typing import Any

import pyvips
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from berth.services.config import ImgProcessConfig
from berth.services.errors import BadRequest, InvalidParameter, ServiceError
from berth.services.imaging import check_decodable, init_vips, probe
from berth.services.imgprocess import pipeline
from berth.services.imgprocess.params import Plan, encode_b64, parse, parse_pairs
from berth.services.pool import Admission
from berth.services.shell import ServiceShell
from berth.services.upload import Body

NAME = "imgprocess"
SEPARATOR = "!"
THUMB_HEADER = "x-gmkerl-thumb"
PIPELINE_HEADER = "x-pipeline"


def plan_from_request(path: str, header: str | None) -> Plan:
    """Parameters come after '!' in the path (`/cat.jpg!/fw/300`) or in x-gmkerl-thumb."""
    _, bang, params = path.partition(SEPARATOR)
    if bang and header is not None:
        raise BadRequest(f"give parameters in the path or in {THUMB_HEADER}, not both")
    return parse(params if bang else header or "")


def _scalar(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    raise InvalidParameter(key, f"{value!r} must be a string, a whole number or a boolean")


def pairs_from_json(operations: Any) -> list[tuple[str, str]]:
    """``[{"fw": 300}, {"watermark": {"text": "hi", "size": 20}}]`` -> path pairs.

    The JSON is translated into the path syntax so that one parser validates
    both; watermark text and url are given plainly here, not in base64.
    """
    if isinstance(operations, dict) and "operations" in operations:
        operations = operations["operations"]
    if isinstance(operations, dict):
        operations = [{k: v} for k, v in operations.items()]
    if not isinstance(operations, list):
        raise InvalidParameter("operations", "must be a list of {key: value} objects")
    pairs: list[tuple[str, str]] = []
    for op in operations:
        if not isinstance(op, dict) or len(op) != 1:
            raise InvalidParameter("operations", f"{op!r} is not one {{key: value}} object")
        ((key, value),) = op.items()
        if key != "watermark":
            pairs.append((str(key), _scalar(str(key), value)))
            continue
        if not isinstance(value, dict):
            raise InvalidParameter("watermark", "must be an object with text or url")
        kinds = [k for k in ("text", "url") if k in value]
        if len(kinds) != 1:
            raise InvalidParameter("watermark", "needs exactly one of text or url")
        kind = kinds[0]
        pairs.append((f"watermark/{kind}", encode_b64(_scalar(kind, value[kind]))))
        pairs.extend((str(k), _scalar(str(k), v)) for k, v in value.items() if k != kind)
    return pairs


class ImgProcessService:
    def __init__(self, config: ImgProcessConfig) -> None:
        init_vips()
        self.config = config
        self.shell = ServiceShell(NAME, config)

    def __repr__(self) -> str:
        return f"<ImgProcessService {self.shell!r}>"

    def _load_watermark(self, path: str) -> pyvips.Image:
        key = "watermark/url"
        if self.config.watermark_dir is None:
            raise InvalidParameter(key, "image watermarks are not enabled (watermark_dir)")
        file = self.config.watermark_dir / pipeline.check_watermark_path(path)
        try:
            data = file.read_bytes()
        except OSError:
            raise InvalidParameter(key, f"no watermark image {path!r}") from None
        try:
            # The same limits as an upload: it is a file of unknown origin.
            check_decodable(probe(data, self.config))
        except ServiceError as exc:
            # About the parameter, not the upload: "body is not an image" would mislead.
            raise InvalidParameter(key, f"{path!r}: {exc.message}") from None
        image = pyvips.Image.new_from_buffer(data, "", fail_on="truncated")
        return pipeline.to_srgb(image, honour_icc=True)

    async def _run(self, request: Request, place: Admission, data: Body, plan: Plan) -> Response:
        accept = request.headers.get("accept")
        out = await self.shell.work(
            place, lambda: pipeline.process(data, plan, accept, self.config, self._load_watermark)
        )
        headers = {
            "x-upyun-width": str(out.width),
            "x-upyun-height": str(out.height),
            "x-upyun-frames": str(out.frames),
            "x-upyun-file-type": out.format.upyun,
        }
        if out.vary_accept:
            headers["vary"] = "Accept"
        return Response(out.body, media_type=out.format.mime, headers=headers)

    async def process(self, request: Request) -> Response:
        plan = plan_from_request(request.url.path, request.headers.get(THUMB_HEADER))
        async with self.shell.admit() as place:
            upload = await self.shell.read(request)
            return await self._run(request, place, upload.data, plan)

    async def pipeline(self, request: Request) -> Response:
        async with self.shell.admit() as place:
            upload = await self.shell.read(request)
            raw = upload.fields.get("operations", request.headers.get(PIPELINE_HEADER))
            if raw is None:
                raise BadRequest(
                    "send the operations as multipart field 'operations' "
                    f"or header {PIPELINE_HEADER}"
                )
            try:
                operations = json.loads(raw)
            except ValueError as exc:
                raise InvalidParameter("operations", f"is not valid JSON: {exc}") from None
            except RecursionError:
                raise InvalidParameter("operations", "is nested too deeply") from None
            plan = parse_pairs(pairs_from_json(operations))
            return await self._run(request, place, upload.data, plan)

    def app(self) -> Starlette:
        return self.shell.app(
            [
                Route("/pipeline", self.shell.endpoint(self.pipeline), methods=["POST", "PUT"]),
                Route("/{path:path}", self.shell.endpoint(self.process), methods=["PUT", "POST"]),
            ]
        )
