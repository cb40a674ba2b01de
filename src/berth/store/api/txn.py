"""/v1/txn: several KV operations applied atomically, or none of them."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.types import Send

from berth.store.api.http import Request, check_consistency, respond
from berth.store.errors import BadRequest, InvalidState, MethodNotAllowed, PayloadTooLarge
from berth.store.keys import key_problem
from berth.store.state import Tx

if TYPE_CHECKING:
    from berth.store.server import StoreServer

VERBS = frozenset(
    {
        "set",
        "cas",
        "lock",
        "unlock",
        "get",
        "get-or-empty",
        "get-tree",
        "check-index",
        "check-session",
        "check-not-exists",
        "delete",
        "delete-tree",
        "delete-cas",
    }
)


@dataclass(slots=True, frozen=True)
class KVOp:
    verb: str
    key: str
    value: bytes | None
    flags: int
    index: int
    session: str


class OpFailed(Exception):
    """One operation's failure; the whole transaction rolls back."""


def _lower(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise BadRequest(f"{where} must be a JSON object")
    return {str(k).lower(): v for k, v in doc.items()}


def _uint(doc: dict[str, Any], name: str, where: str) -> int:
    value = doc.get(name) or 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**64:
        raise BadRequest(f"{where}: {name} must be an unsigned integer")
    return value


def parse_ops(doc: Any, max_ops: int) -> list[KVOp]:
    """Decode the request body into KV operations; a malformed body is a 400."""
    if not isinstance(doc, list):
        raise BadRequest("Failed to parse body: expected a JSON array of operations")
    if len(doc) > max_ops:
        raise PayloadTooLarge(f"Transaction contains too many operations ({len(doc)} > {max_ops})")
    ops: list[KVOp] = []
    for i, raw in enumerate(doc):
        where = f"operation {i}"
        outer = _lower(raw, where)
        if set(outer) != {"kv"}:
            raise BadRequest(f"{where}: berth supports only KV operations in /v1/txn")
        kv = _lower(outer["kv"], where + ".KV")
        verb = kv.get("verb")
        key = kv.get("key", "")
        if not isinstance(verb, str) or not isinstance(key, str):
            raise BadRequest(f"{where}: Verb and Key must be strings")
        value = kv.get("value")
        if value is not None:
            if not isinstance(value, str):
                raise BadRequest(f"{where}: Value must be base64 text")
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise BadRequest(f"{where}: Value is not valid base64") from None
        session = kv.get("session") or ""
        if not isinstance(session, str):
            raise BadRequest(f"{where}: Session must be a string")
        ops.append(
            KVOp(
                verb=verb,
                key=key,
                value=value or None,
                flags=_uint(kv, "flags", where),
                index=_uint(kv, "index", where),
                session=session,
            )
        )
    return ops


def _written(tx: Tx, key: str) -> list[dict[str, Any]]:
    """A write's result: the entry as stored, without its value (as Consul answers)."""
    entry = tx.state.kv.get(key)
    return [] if entry is None else [{"KV": entry.doc(with_value=False)}]


def apply_op(tx: Tx, op: KVOp, now: float) -> list[dict[str, Any]]:
    """Apply one operation; returns its result entries or raises OpFailed."""
    if op.verb not in VERBS:
        raise OpFailed(f"unknown KV verb {op.verb!r}")
    if (problem := key_problem(op.key)) is not None:
        raise OpFailed(f"invalid key {op.key!r}: {problem}")
    if not op.key and op.verb not in ("get-tree", "delete-tree"):
        raise OpFailed("Missing key name")
    state = tx.state
    current = state.kv.get(op.key)
    match op.verb:
        case "set":
            tx.kv_set(op.key, op.value, op.flags)
            return _written(tx, op.key)
        case "cas":
            if not tx.kv_cas(op.key, op.value, op.flags, op.index):
                raise OpFailed(f'failed to set key "{op.key}", index is stale')
            return _written(tx, op.key)
        case "lock":
            try:
                locked = tx.kv_acquire(op.key, op.value, op.flags, op.session, now)
            except InvalidState as exc:
                raise OpFailed(exc.message) from None
            if not locked:
                raise OpFailed(f'failed to lock key "{op.key}", lock is already held')
            return _written(tx, op.key)
        case "unlock":
            if not tx.kv_release(op.key, op.value, op.flags, op.session):
                raise OpFailed(
                    f'failed to unlock key "{op.key}", lock isn\'t held, '
                    "or is held by another session"
                )
            return _written(tx, op.key)
        case "get":
            if current is None:
                raise OpFailed(f'key "{op.key}" doesn\'t exist')
            return [{"KV": current.doc()}]
        case "get-or-empty":
            return [{"KV": current.doc()}] if current else []
        case "get-tree":
            return [{"KV": e.doc()} for e in state.kv_list(op.key)[1]]
        case "check-index":
            if current is None:
                raise OpFailed(f'key "{op.key}" doesn\'t exist')
            if current.modify_index != op.index:
                raise OpFailed(f"current modify index {current.modify_index} != {op.index}")
            return [{"KV": current.doc(with_value=False)}]
        case "check-session":
            if current is None:
                raise OpFailed(f'key "{op.key}" doesn\'t exist')
            if (current.session or "") != op.session:
                raise OpFailed(f'current session "{current.session or ""}" != "{op.session}"')
            return [{"KV": current.doc(with_value=False)}]
        case "check-not-exists":
            if current is not None:
                raise OpFailed(f'key "{op.key}" exists')
            return []
        case "delete":
            tx.kv_delete(op.key)
            return []
        case "delete-tree":
            tx.kv_delete_tree(op.key)
            return []
        case _:  # delete-cas
            if not tx.kv_delete_cas(op.key, op.index):
                raise OpFailed(f'failed to delete key "{op.key}", index is stale')
            return []


class Rollback(Exception):
    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors


def run_ops(tx: Tx, ops: list[KVOp], now: float) -> list[dict[str, Any]]:
    """All operations in order; any failure rolls all of them back (Rollback)."""
    results: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for i, op in enumerate(ops):
        try:
            results.extend(apply_op(tx, op, now))
        except OpFailed as exc:
            errors.append({"OpIndex": i, "What": str(exc)})
    if errors:
        raise Rollback(errors)
    return results


async def handle(store: StoreServer, req: Request, send_: Send) -> None:
    if req.method != "PUT":
        raise MethodNotAllowed(f"method {req.method} not allowed")
    check_consistency(req)
    ops = parse_ops(await req.json(store.config.limit_txn_bytes), store.config.limit_txn_ops)
    now = store.now()
    try:
        results = await store.write(lambda tx: run_ops(tx, ops, now))
    except Rollback as rb:
        body = store.dumps({"Results": None, "Errors": rb.errors})
        await respond(send_, 409, body, index=store.state.index)
        return
    body = store.dumps({"Results": results or None, "Errors": None})
    await respond(send_, 200, body, index=store.state.index)
