"""The gateway's admin API (127.0.0.1:3132): upstream status, dynamic upstreams, metrics.

Shapes follow Slardar's status.lua so its users' scripts keep working:
``GET /status`` nests servers by level under ``"cls:<name>"``, ``PUT/POST
/upstream/<name>`` takes ``{"servers": [...]}`` (level 1) or ``{"cluster":
[...]}`` (every level) and answers ``{"status": 200}``. Unlike Slardar, an
update is written to the store, so every gateway applies it and a restart
keeps it (upyun/slardar#45), and writes need the token when one is set.

With ``--workers N`` only worker 0 serves this API; ``/status`` and
``/metrics`` then show every worker merged (workers.py): counters summed, and
each server with the worst status any worker sees, that worker's msg and
fail_num, and which worker it is.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HttpRoute
from starlette.types import ASGIApp

import berth
from berth.gateway import metrics
from berth.gateway.cluster import Cluster, Server, ServerStatus, check_to_json, parse_upstream
from berth.gateway.config import GatewayConfig
from berth.gateway.discovery import ROUTES, UPSTREAMS, Discovery, parse_routes_value
from berth.gateway.routes import HOST_RE, NAME_RE, normalize_host, route_to_json
from berth.gateway.workers import MergedServer, PeerCollector, WorkersView
from berth.store.client import StoreClient
from berth.store.errors import StoreRejected, StoreUnavailable

BODY_LIMIT = 1 << 20  # Slardar's client_max_body_size for the admin server
APPLY_WAIT = 3.0  # how long a write waits to see its change in this worker's table
CAS_ATTEMPTS = 5
WRITE_METHODS = ("PUT", "POST", "DELETE")


class AdminError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def _reply(status: int, msg: str | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"status": status}
    if msg is not None:
        body["msg"] = msg
    body.update(extra)
    return JSONResponse(body, status_code=status)


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


# -- read views (pure: table -> JSON) ---------------------------------------------------------


def server_status(
    cluster: Cluster, server: Server, now: float, merged: MergedServer | None = None
) -> dict[str, Any]:
    """One server as Slardar shows it; ``merged`` is its state across workers."""
    doc: dict[str, Any] = {
        "server": f"{cluster.name}:{server.address}",
        "address": server.address,
        "weight": server.weight,
        "max_fails": server.max_fails,
        "fail_timeout": server.fail_timeout,
    }
    # This worker's view of the server, or every worker's merged: same fields.
    state: Server | MergedServer = server if merged is None else merged
    status = state.status
    doc |= {
        "status": status.value,
        "msg": state.msg,
        "fail_num": state.fail_num,
        "lastmodified": _timestamp(state.lastmodified),
        "active": state.active,
    }
    if merged is not None:
        doc["worker"] = merged.worker
        doc["worker_status"] = {str(i): st.value for i, st in merged.by_worker.items()}
    doc["source"] = server.source
    ej = server.ejection
    if ej is not None and ej.until > now:
        doc["ejection"] = {"by": ej.by, "reason": ej.reason, "until": ej.until}
        if status is ServerStatus.EJECTED:
            doc["msg"] = f"ejected by {ej.by}: {ej.reason}" if ej.by else f"ejected: {ej.reason}"
    return doc


def _merged(view: WorkersView | None, cluster: str, server: Server) -> MergedServer | None:
    return None if view is None else view.servers.get((cluster, server.address))


def status_doc(
    discovery: Discovery, config: GatewayConfig, view: WorkersView | None = None
) -> dict[str, Any]:
    """Slardar's /status; with ``view`` (several workers) every worker merged into it.
    Worker 0's routing table decides which servers are listed: a peer's table
    differs only while a store change is reaching it."""
    now = time.time()
    table = discovery.table
    doc: dict[str, Any] = {}
    for name in sorted(table.clusters):
        cluster = table.clusters[name]
        doc[f"cls:{name}"] = [
            [server_status(cluster, s, now, _merged(view, name, s)) for s in level]
            for level in cluster.levels
        ]
    health = discovery.health
    checks_done, last_check, alive = health.checks_done, health.last_check_time, health.alive
    timers = {"worker-0": "alive" if discovery.ready.is_set() else "starting"}
    if view is not None:
        checks_done, last_check, alive = view.checks_done, view.last_check_time, view.checker_alive
        timers = {f"worker-{i}": "missing" for i in range(view.configured)}
        for snap in view.snapshots:
            timers[f"worker-{snap.worker}"] = "alive" if snap.ready else "starting"
        doc["workers"] = workers_doc(view)
    doc.update(
        {
            "last_check_time": _timestamp(last_check) if checks_done else None,
            "checkup_timer_alive": alive,
            "start_time": _timestamp(discovery.started_at),
            "conf_hash": None,
            "shd_config_version": table.version,
            "config_timer": timers,
            "berth_version": berth.__version__,
            "store": {
                "url": discovery.store.url,
                "ready": discovery.ready.is_set(),
                "error": discovery.store_error,
                "bad_keys": discovery.bad_keys,
            },
        }
    )
    return doc


def workers_doc(view: WorkersView) -> dict[str, Any]:
    return {
        "configured": view.configured,
        "missing": view.missing,
        "reporting": [
            {
                "worker": snap.worker,
                "pid": snap.pid,
                "started": _timestamp(snap.started),
                "requests": snap.metrics.requests_total(),
                "connections_active": snap.metrics.connections_active,
            }
            for snap in view.snapshots
        ],
    }


def upstream_doc(cluster: Cluster) -> dict[str, Any]:
    return {
        "cluster": [
            {
                "servers": [
                    {
                        "host": s.host,
                        "port": s.port,
                        "weight": s.weight,
                        "max_fails": s.max_fails,
                        "fail_timeout": s.fail_timeout,
                        "source": s.source,
                    }
                    for s in level
                ]
            }
            for level in cluster.levels
        ],
        "health_check": check_to_json(cluster.check),
        "protected": cluster.protected,
    }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def health_metrics(discovery: Discovery, view: WorkersView | None = None) -> str:
    table = discovery.table
    now = time.time()
    out = [
        "# HELP berth_gateway_upstream_server_up 1 when the server takes traffic (not down,"
        " not ejected).",
        "# TYPE berth_gateway_upstream_server_up gauge",
    ]
    status_lines = [
        "# HELP berth_gateway_upstream_server_status The server's status (one series per status).",
        "# TYPE berth_gateway_upstream_server_status gauge",
    ]
    active_lines = [
        "# HELP berth_gateway_upstream_server_active In-flight requests to the server.",
        "# TYPE berth_gateway_upstream_server_active gauge",
    ]
    fail_lines = [
        "# HELP berth_gateway_upstream_server_fails Consecutive failures of the server.",
        "# TYPE berth_gateway_upstream_server_fails gauge",
    ]
    mono = time.monotonic()
    for name in sorted(table.clusters):
        for server in table.clusters[name].servers:
            labels = f'cluster="{_label(name)}",server="{_label(server.address)}"'
            merged = _merged(view, name, server)
            if merged is None:
                up, current = server.available(mono, now), server.status
                active, fails = server.active, server.fail_num
            else:
                up, current = merged.up, merged.status
                active, fails = merged.active, merged.fail_num
            out.append(f"berth_gateway_upstream_server_up{{{labels}}} {int(up)}")
            for st in ServerStatus:
                status_lines.append(
                    f'berth_gateway_upstream_server_status{{{labels},status="{st.value}"}} '
                    f"{int(st is current)}"
                )
            active_lines.append(f"berth_gateway_upstream_server_active{{{labels}}} {active}")
            fail_lines.append(f"berth_gateway_upstream_server_fails{{{labels}}} {fails}")
    out += status_lines + active_lines + fail_lines
    checks_done = discovery.health.checks_done if view is None else view.checks_done
    store_up = discovery.store_error is None if view is None else view.store_up
    out += [
        "# HELP berth_gateway_routing_table_version Routing table swaps since start.",
        "# TYPE berth_gateway_routing_table_version gauge",
        f"berth_gateway_routing_table_version {table.version}",
        "# HELP berth_gateway_health_checks_total Active health checks run.",
        "# TYPE berth_gateway_health_checks_total counter",
        f"berth_gateway_health_checks_total {checks_done}",
        "# HELP berth_gateway_store_up 1 when the last store watch succeeded.",
        "# TYPE berth_gateway_store_up gauge",
        f"berth_gateway_store_up {int(store_up)}",
    ]
    return "\n".join(out) + "\n"


def worker_metrics(view: WorkersView) -> str:
    out = [
        "# HELP berth_gateway_workers Worker processes: configured, and reporting to this view.",
        "# TYPE berth_gateway_workers gauge",
        f'berth_gateway_workers{{state="configured"}} {view.configured}',
        f'berth_gateway_workers{{state="reporting"}} {len(view.snapshots)}',
        "# HELP berth_gateway_worker_start_time_seconds When each worker started; its"
        " counters count from then.",
        "# TYPE berth_gateway_worker_start_time_seconds gauge",
    ]
    for snap in view.snapshots:
        out.append(
            f'berth_gateway_worker_start_time_seconds{{worker="{snap.worker}"}} {snap.started:.3f}'
        )
    return "\n".join(out) + "\n"


# -- writes --------------------------------------------------------------------------------------


async def _read_json(request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > BODY_LIMIT):
        raise AdminError(413, f"body over {BODY_LIMIT} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > BODY_LIMIT:
            raise AdminError(413, f"body over {BODY_LIMIT} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise AdminError(400, "decode body error") from None


def merged_upstream(new: dict[str, Any], existing: dict[str, Any] | None) -> dict[str, Any]:
    """The store document after an update, Slardar's way.

    ``{"servers": [...]}`` replaces level 1 and keeps the other levels;
    ``{"cluster": [...]}`` replaces every level; a body with neither keeps the
    servers. Each keeps the stored health check and protect flag unless the
    body gives them.
    """
    if existing is None:
        return dict(new)
    doc = {k: v for k, v in existing.items() if k not in ("servers", "cluster")}
    for key in ("health_check", "protected"):
        if key in new:
            doc[key] = new[key]
    if "cluster" in new:
        doc["cluster"] = new["cluster"]
        return doc
    if "servers" not in new:
        # Only settings given: the stored servers stay as they are.
        for key in ("servers", "cluster"):
            if key in existing:
                doc[key] = existing[key]
        return doc
    old_levels = existing.get("cluster")
    if isinstance(old_levels, list) and len(old_levels) > 1:
        doc["cluster"] = [{"servers": new["servers"]}, *old_levels[1:]]
    else:
        doc["servers"] = new["servers"]
    return doc


class AdminApp:
    def __init__(
        self,
        discovery: Discovery,
        config: GatewayConfig,
        store: StoreClient,
        workers: PeerCollector | None = None,
    ) -> None:
        self.discovery = discovery
        self.config = config
        self.store = store
        # None with one worker: this process's own state is the whole view.
        self.workers = workers
        self._token = config.token.encode() if config.token else None

    def __repr__(self) -> str:
        return f"<AdminApp token={'set' if self._token else 'none'} {self.discovery!r}>"

    def authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        given = request.headers.get("x-berth-token")
        if given is None:
            auth = request.headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    async def status(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _reply(405, "method not allowed")
        view = await self.workers.view() if self.workers is not None else None
        return JSONResponse(status_doc(self.discovery, self.config, view))

    async def upstreams(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _reply(405, "method not allowed")
        table = self.discovery.table
        return JSONResponse(
            {name: upstream_doc(table.clusters[name]) for name in sorted(table.clusters)}
        )

    async def routes(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _reply(405, "method not allowed")
        return JSONResponse(
            [{"host": r.host, **route_to_json(r)} for r in self.discovery.table.routes]
        )

    async def metrics(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _reply(405, "method not allowed")
        if self.workers is None:
            text = metrics.render() + health_metrics(self.discovery)
        else:
            view = await self.workers.view()
            text = view.metrics.render() + health_metrics(self.discovery, view)
            text += worker_metrics(view)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def upstream(self, request: Request) -> Response:
        name: str = request.path_params["name"]
        method = request.method
        if method not in ("GET", *WRITE_METHODS):
            return _reply(405, "method not allowed")
        if not NAME_RE.match(name):
            return _reply(400, "invalid upstream name: must match [-_a-zA-Z0-9.]+")
        if method == "GET":
            cluster = self.discovery.table.clusters.get(name)
            if cluster is None:
                return _reply(404, f"no such upstream: {name}")
            return JSONResponse(upstream_doc(cluster))
        if not self.authorized(request):
            return _reply(403, "missing or wrong token (X-Berth-Token or Authorization: Bearer)")
        try:
            if method == "DELETE":
                return await self._delete(name)
            return await self._put(name, await _read_json(request))
        except AdminError as exc:
            return _reply(exc.status, exc.msg)
        except StoreUnavailable as exc:
            return _reply(503, f"store unavailable: {exc}")
        except StoreRejected as exc:
            return _reply(502, f"store refused the write: {exc.message}")

    async def _put(self, name: str, body: Any) -> Response:
        if not isinstance(body, dict):
            raise AdminError(400, "body invalid: must be a JSON object")
        try:
            parse_upstream(name, body, self.discovery.default_check)
        except ValueError as exc:
            raise AdminError(400, f"body invalid: {exc}") from None
        key = UPSTREAMS + name
        for _ in range(CAS_ATTEMPTS):
            entry = await self.store.kv_get(key)
            existing = None
            if entry is not None and entry.value:
                try:
                    loaded = json.loads(entry.value)
                    existing = loaded if isinstance(loaded, dict) else None
                except ValueError:
                    existing = None  # a broken stored value is simply replaced
            doc = merged_upstream(body, existing)
            try:
                parse_upstream(name, doc, self.discovery.default_check)
            except ValueError as exc:
                raise AdminError(400, f"body invalid: {exc}") from None
            raw = json.dumps(doc, separators=(",", ":")).encode()
            # Check-and-set on the index we read, so two admins' merges never lose one.
            if await self.store.kv_put(key, raw, cas=0 if entry is None else entry.modify_index):
                break
        else:
            raise AdminError(409, "upstream changed concurrently; try again")
        applied = await self.discovery.wait_for(
            lambda: self.discovery.raw_value(key) == raw, APPLY_WAIT
        )
        return _reply(200, applied=applied)

    async def _delete(self, name: str) -> Response:
        key = UPSTREAMS + name
        if await self.store.kv_get(key) is None:
            raise AdminError(404, f"no such upstream: {name}")
        await self.store.kv_delete(key)
        applied = await self.discovery.wait_for(
            lambda: self.discovery.raw_value(key) is None, APPLY_WAIT
        )
        return _reply(200, applied=applied)


class RouteAdmin:
    """``/route/<host>``: the same life cycle for routes (berth's addition to Slardar's API)."""

    def __init__(self, admin: AdminApp) -> None:
        self.admin = admin

    async def handle(self, request: Request) -> Response:
        admin = self.admin
        method = request.method
        if method not in ("GET", "HEAD", *WRITE_METHODS):
            return _reply(405, "method not allowed")
        host = normalize_host(request.path_params["host"])
        if not HOST_RE.match(host):
            return _reply(400, "invalid host: a host name or *.suffix wildcard")
        key = ROUTES + host
        if method in ("GET", "HEAD"):
            routes = [r for r in admin.discovery.table.routes if r.host == host]
            if not routes:
                return _reply(404, f"no route for host: {host}")
            return JSONResponse([{"host": r.host, **route_to_json(r)} for r in routes])
        if not admin.authorized(request):
            return _reply(403, "missing or wrong token (X-Berth-Token or Authorization: Bearer)")
        try:
            if method == "DELETE":
                if await admin.store.kv_get(key) is None:
                    raise AdminError(404, f"no route for host: {host}")
                await admin.store.kv_delete(key)
                applied = await admin.discovery.wait_for(
                    lambda: admin.discovery.raw_value(key) is None, APPLY_WAIT
                )
                return _reply(200, applied=applied)
            body = await _read_json(request)
            try:
                parse_routes_value(host, body)
            except ValueError as exc:
                raise AdminError(400, f"body invalid: {exc}") from None
            raw = json.dumps(body, separators=(",", ":")).encode()
            await admin.store.kv_put(key, raw)
            applied = await admin.discovery.wait_for(
                lambda: admin.discovery.raw_value(key) == raw, APPLY_WAIT
            )
            return _reply(200, applied=applied)
        except AdminError as exc:
            return _reply(exc.status, exc.msg)
        except StoreUnavailable as exc:
            return _reply(503, f"store unavailable: {exc}")
        except StoreRejected as exc:
            return _reply(502, f"store refused the write: {exc.message}")


async def _not_found(request: Request, exc: Exception) -> Response:
    return _reply(404, f"no such endpoint: {request.url.path}")


def create_admin_app(
    discovery: Discovery,
    config: GatewayConfig,
    store: StoreClient,
    workers: PeerCollector | None = None,
) -> ASGIApp:
    admin = AdminApp(discovery, config, store, workers)
    methods = ["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"]
    return Starlette(
        routes=[
            HttpRoute("/status", admin.status, methods=methods),
            HttpRoute("/upstreams", admin.upstreams, methods=methods),
            HttpRoute("/routes", admin.routes, methods=methods),
            HttpRoute("/upstream/{name}", admin.upstream, methods=methods),
            HttpRoute("/route/{host}", RouteAdmin(admin).handle, methods=methods),
            HttpRoute("/metrics", admin.metrics, methods=methods),
        ],
        exception_handlers={404: _not_found},
    )
