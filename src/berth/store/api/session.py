"""/v1/session: create, destroy, renew, info, list."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import Send

from berth.store.api.http import Request, check_consistency, require_method, respond
from berth.store.definitions import parse_session
from berth.store.errors import NotFound

if TYPE_CHECKING:
    from berth.store.server import StoreServer


async def handle(store: StoreServer, req: Request, send_: Send) -> None:
    rest = req.path[len("/v1/session/") :]
    verb, _, sid = rest.partition("/")
    state = store.state
    cfg = store.config
    if verb == "create" and not sid:
        require_method(req, "PUT")
        session = parse_session(
            await req.json(cfg.limit_body_bytes),
            node=cfg.node_name,
            ttl_min_s=cfg.session_ttl_min_s,
            ttl_max_s=cfg.session_ttl_max_s,
        )
        created = await store.write(lambda tx: tx.session_create(session))
        await respond(send_, 200, store.dumps({"ID": created}))
    elif verb == "destroy" and sid:
        require_method(req, "PUT")
        now = store.now()
        await store.write(lambda tx: tx.session_destroy(sid, now))
        await respond(send_, 200, b"true")
    elif verb == "renew" and sid:
        require_method(req, "PUT")
        renewed = state.sessions.get(sid)
        if renewed is None:
            raise NotFound(f"Session id '{sid}' not found")
        store.sessions.renew(sid)
        await respond(send_, 200, store.dumps([renewed.doc()]), index=state.table_index("sessions"))
    elif verb == "info" and sid:
        require_method(req, "GET")
        check_consistency(req)

        def info() -> tuple[int, list[dict[str, object]]]:
            found = state.sessions.get(sid)
            return state.table_index("sessions"), [found.doc()] if found else []

        index, docs = await store.block(req, info, topic="sessions")
        await respond(send_, 200, store.dumps(docs), index=index)
    elif verb in ("list", "node") and (bool(sid) == (verb == "node")):
        require_method(req, "GET")
        check_consistency(req)

        def listing() -> tuple[int, list[dict[str, object]]]:
            docs = [
                s.doc()
                for s in sorted(state.sessions.values(), key=lambda s: s.create_index)
                if verb == "list" or s.node == sid
            ]
            return state.table_index("sessions"), docs

        index, docs = await store.block(req, listing, topic="sessions")
        await respond(send_, 200, store.dumps(docs), index=index)
    else:
        raise NotFound(f"unknown session endpoint {req.path}")
