"""Reading an uploaded image: raw PUT/POST body or multipart field ``file``, size-capped."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message

from berth.services.errors import BadRequest, BodyTooLarge, ClientDisconnected
from berth.services.http import WHOLE_BODY, WholeBody

FILE_FIELD = "file"

# A large upload arrives as one bytearray (read straight into it, see http.py);
# copying it into bytes would cost as much as the reading saved.
Body = bytes | bytearray


@dataclass(frozen=True)
class Upload:
    data: Body
    # Other multipart text fields (the pipeline's "operations", for example).
    fields: dict[str, str] = field(default_factory=dict)


async def read_body(request: Request, limit: int) -> Body:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(f"content-length {declared!r} is not a number")
        if int(declared) > limit:
            raise BodyTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    whole: WholeBody | None = request.scope.get("extensions", {}).get(WHOLE_BODY)
    if whole is not None:
        body = await whole()
        if body is None:
            raise ClientDisconnected("client left during the body")
        return body
    chunks: list[bytes] = []
    size = 0
    # Chunked uploads have no declared length, so the cap is enforced as we go.
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientDisconnected(f"client left after {size} bytes of the body") from None
    return b"".join(chunks)


async def read_upload(request: Request, limit: int) -> Upload:
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        if not body:
            raise BadRequest("empty body: send the image as the body or multipart field 'file'")
        return Upload(body)
    return await _multipart(request, body)


async def _multipart(request: Request, body: Body) -> Upload:
    sent = False

    async def replay() -> Message:
        # The body was already read (with the cap); hand it to starlette's parser once.
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as exc:  # python-multipart raises several unrelated types
        raise BadRequest(f"malformed multipart body: {exc}") from None
    try:
        data: bytes | None = None
        fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == FILE_FIELD:
                    data = await value.read()
            else:
                fields[name] = value
        if data is None:
            raise BadRequest("multipart body has no file field 'file'")
        if not data:
            raise BadRequest("multipart field 'file' is empty")
        return Upload(data, fields)
    finally:
        await form.close()
