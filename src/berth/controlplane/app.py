"""Dispatch by path prefix to the components, with one token policy for all of them.

A plain ASGI callable rather than a Starlette router: the store's KV reads are
the hottest path of the platform and a prefix check is all the routing needed.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Sequence
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from berth.controlplane.component import Component

log = logging.getLogger("berth.controlplane")

OPEN_PATHS = frozenset({"/health", "/ping"})


def _request_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-consul-token":
            return str(value.decode("latin-1"))
        if name == b"authorization":
            # "Bearer <t>" for people and curl; "token=<t>" is what the
            # marathon client sends (its DC/OS auth form).
            lowered = value[:7].lower()
            if lowered == b"bearer ":
                return str(value[7:].decode("latin-1").strip())
            if lowered[:6] == b"token=":
                return str(value[6:].decode("latin-1").strip())
    query = scope.get("query_string", b"")
    if b"token=" in query:
        for key, value in parse_qsl(query.decode("latin-1")):
            if key == "token":
                return str(value)
    return None


async def _respond(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ControlPlaneApp:
    def __init__(self, components: Sequence[Component], token: str | None = None) -> None:
        self.components = list(components)
        self._token = token.encode() if token else None
        # Longest prefix first so "/v2/apps" can never be shadowed by "/v2".
        self._routes = sorted(
            ((p, c) for c in self.components for p in c.prefixes), key=lambda r: -len(r[0])
        )

    def __repr__(self) -> str:
        return f"<ControlPlaneApp prefixes={[p for p, _ in self._routes]}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if self._token is not None and path not in OPEN_PATHS and not self._authorized(scope):
            if path.startswith("/v1/"):
                # Consul's wording, so Consul clients report it as an ACL denial.
                await _respond(send, 403, b"Permission denied", b"text/plain; charset=utf-8")
            else:
                body = json.dumps({"message": "missing or wrong token"}).encode()
                await _respond(send, 403, body, b"application/json")
            return
        for prefix, component in self._routes:
            if path.startswith(prefix):
                await component(scope, receive, send)
                return
        if path == "/health":
            await _respond(send, 200, b'{"status":"ok"}', b"application/json")
            return
        body = json.dumps({"message": f"no such endpoint: {path}"}).encode()
        await _respond(send, 404, body, b"application/json")

    def _authorized(self, scope: Scope) -> bool:
        assert self._token is not None
        given = _request_token(scope)
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        started: list[Component] = []
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for component in self.components:
                        await component.start()
                        started.append(component)
                except Exception as exc:
                    log.exception("control plane failed to start")
                    for component in reversed(started):
                        await component.stop()
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Reverse order: the scheduler stops its tasks while the store is still up.
                for component in reversed(started):
                    try:
                        await component.stop()
                    except Exception:
                        log.exception("error stopping %r", component)
                await send({"type": "lifespan.shutdown.complete"})
                return
