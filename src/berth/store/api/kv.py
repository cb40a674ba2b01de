"""/v1/kv: Consul's KV endpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import Send

from berth.store.api.http import JSON, Request, check_consistency, respond
from berth.store.errors import BadRequest, MethodNotAllowed
from berth.store.keys import validate_key
from berth.store.model import Entry

if TYPE_CHECKING:
    from berth.store.server import StoreServer

PREFIX_LEN = len("/v1/kv/")
RAW_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", b"sandbox")]


async def handle(store: StoreServer, req: Request, send_: Send) -> None:
    key = req.path[PREFIX_LEN:]
    if key:
        validate_key(key)
    if req.method == "GET":
        await _get(store, req, key, send_)
    elif req.method == "PUT":
        await _put(store, req, key, send_)
    elif req.method == "DELETE":
        await _delete(store, req, key, send_)
    else:
        raise MethodNotAllowed(f"method {req.method} not allowed")


def _list_body(entries: list[Entry]) -> bytes:
    return b"[" + b",".join(e.encoded() for e in entries) + b"]"


async def _get(store: StoreServer, req: Request, key: str, send_: Send) -> None:
    check_consistency(req)
    state = store.state
    if req.flag("keys"):
        sep = req.param("separator") or req.param("seperator")
        index, keys = await store.block(req, lambda: state.kv_keys(key, sep), key)
        if not keys and key:
            await respond(send_, 404, b"", index=index)
        else:
            await respond(send_, 200, store.dumps(keys), index=index)
        return
    if req.flag("recurse"):
        index, entries = await store.block(req, lambda: state.kv_list(key), key)
        if not entries:
            await respond(send_, 404, b"", index=index)
        else:
            await respond(send_, 200, _list_body(entries), index=index)
        return
    if not key:
        raise BadRequest("Missing key name")
    index, entry = await store.block(req, lambda: state.kv_get(key), key)
    if entry is None:
        await respond(send_, 404, b"", index=index)
    elif req.flag("raw"):
        await respond(send_, 200, entry.value or b"", b"text/plain", index=index, extra=RAW_HEADERS)
    else:
        await respond(send_, 200, b"[" + entry.encoded() + b"]", index=index)


async def _put(store: StoreServer, req: Request, key: str, send_: Send) -> None:
    if not key:
        raise BadRequest("Missing key name")
    chosen = [name for name in ("cas", "acquire", "release") if name in req.query]
    if len(chosen) > 1:
        raise BadRequest("Conflicting flags: " + "&".join(chosen))
    flags = req.uint("flags", "flags") or 0
    cas = req.uint("cas", "cas index")
    acquire = req.param("acquire") if "acquire" in req.query else None
    release = req.param("release") if "release" in req.query else None
    if acquire == "" or release == "":
        raise BadRequest("acquire and release need a session ID")
    raw = await req.body(store.config.limit_value_bytes)
    value = raw or None
    now = store.now()
    if cas is not None:
        ok = await store.write(lambda tx: tx.kv_cas(key, value, flags, cas))
    elif acquire is not None:
        ok = await store.write(lambda tx: tx.kv_acquire(key, value, flags, acquire, now))
    elif release is not None:
        ok = await store.write(lambda tx: tx.kv_release(key, value, flags, release))
    else:
        ok = await store.write(lambda tx: tx.kv_set(key, value, flags))
    await respond(send_, 200, b"true" if ok else b"false", JSON)


async def _delete(store: StoreServer, req: Request, key: str, send_: Send) -> None:
    recurse = req.flag("recurse")
    cas = req.uint("cas", "cas index")
    if recurse and cas is not None:
        raise BadRequest("Conflicting flags: cas&recurse")
    if not key and not recurse:
        raise BadRequest("Missing key name")
    if recurse:
        ok = await store.write(lambda tx: tx.kv_delete_tree(key))
    elif cas is not None:
        ok = await store.write(lambda tx: tx.kv_delete_cas(key, cas))
    else:
        ok = await store.write(lambda tx: tx.kv_delete(key))
    await respond(send_, 200, b"true" if ok else b"false", JSON)
