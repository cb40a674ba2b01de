"""The Marathon ``/v2`` REST API (and ``/ping``) over the scheduler core.

This module is the boundary: it parses requests into definitions, calls the
``Scheduler``, renders its state as Marathon JSON, and maps the core's errors
to Marathon's status codes and bodies. Starlette routing is enough here; none
of these endpoints is on a hot path.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from berth import __version__
from berth.scheduler import errors
from berth.scheduler.config import SchedulerConfig
from berth.scheduler.events import EventBus, EventStreamEndpoint
from berth.scheduler.models import (
    AppDefinition,
    ValidationFailed,
    merge_app,
    normalize_id,
    now_timestamp,
    parse_app,
    parse_bool,
)
from berth.scheduler.render import (
    DeploymentView,
    QueueView,
    StatusView,
    TaskView,
    parse_embed,
    render_app,
    render_deployment,
    render_group,
    render_info,
    render_queue,
    render_task,
    render_tasks_text,
)
from berth.store.client import StoreClient
from berth.store.errors import StoreUnavailable

log = logging.getLogger("berth.scheduler.api")

MAX_BODY_BYTES = 1024 * 1024
READY_TIMEOUT_SECONDS = 10.0
DEPLOYMENT_HEADER = "Marathon-Deployment-Id"
TASK_STATUSES = {
    "staging": "TASK_STAGING",
    "starting": "TASK_STARTING",
    "running": "TASK_RUNNING",
    "killing": "TASK_KILLING",
    "finished": "TASK_FINISHED",
    "failed": "TASK_FAILED",
    "killed": "TASK_KILLED",
    "lost": "TASK_LOST",
}


class SchedulerAPI(Protocol):
    """What the API needs from ``berth.scheduler.core.Scheduler``."""

    async def wait_ready(self) -> None: ...
    def apps(self) -> Sequence[AppDefinition]: ...
    def app(self, app_id: str) -> AppDefinition | None: ...
    def status(self, app_id: str) -> StatusView: ...
    def tasks(self, app_id: str | None = None) -> Sequence[TaskView]: ...
    def deployments(self) -> Sequence[DeploymentView]: ...
    def queue(self) -> Sequence[QueueView]: ...
    async def create_app(self, app: AppDefinition) -> DeploymentView: ...
    async def update_app(self, app: AppDefinition, force: bool) -> DeploymentView: ...
    async def delete_app(self, app_id: str, force: bool) -> DeploymentView: ...
    async def restart_app(self, app_id: str, force: bool) -> DeploymentView: ...
    async def kill_tasks(
        self, task_ids: list[str], scale: bool, wipe: bool = False
    ) -> Sequence[TaskView] | DeploymentView: ...
    async def cancel_deployment(self, deployment_id: str, force: bool) -> DeploymentView | None: ...
    async def reset_delay(self, app_id: str) -> None: ...
    def usage(self) -> dict[str, Any]: ...


class ApiError(Exception):
    """A response decided before reaching the core (bad JSON, bad query flag, 404)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"message": message, **extra}


# --------------------------------------------------------------------------- helpers


def _flag(request: Request, name: str, default: bool = False) -> bool:
    try:
        return parse_bool(request.query_params.get(name), default)
    except ValueError:
        raise ApiError(
            400, f"Invalid value for query parameter {name}: expected true or false"
        ) from None


def _app_id(request: Request) -> str:
    return normalize_id(str(request.path_params.get("app_id", "")))


async def _json_body(request: Request) -> Any:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"Request body is larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "Invalid JSON: the request body is empty")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"Invalid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "Invalid JSON: nested too deeply") from None


def _deployment_result(deployment: DeploymentView, status: int = 200) -> JSONResponse:
    return JSONResponse(
        {"deploymentId": deployment.id, "version": deployment.version},
        status_code=status,
        headers={DEPLOYMENT_HEADER: deployment.id},
    )


def _wants_text(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/plain" in accept and "application/json" not in accept


def _selector_terms(selector: str) -> list[str]:
    """Split on commas outside parentheses ("a==1, b in (x, y)" is two terms)."""
    terms: list[str] = []
    depth = 0
    current = ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth = max(0, depth - 1)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t.strip() for t in terms if t.strip()]


def label_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Marathon's label selector: ``k``, ``k==v``, ``k!=v``, ``k in (a, b)``, ``k notin (...)``."""
    for term in _selector_terms(selector):
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "==" in term:
            key, value = (s.strip() for s in term.split("==", 1))
            if labels.get(key) != value:
                return False
        elif term.endswith(")") and (" in " in term or " notin " in term):
            negate = " notin " in term
            key, rest = term.split(" notin " if negate else " in ", 1)
            options = {o.strip() for o in rest.strip().lstrip("(").rstrip(")").split(",")}
            if (labels.get(key.strip()) in options) == negate:
                return False
        elif term not in labels:
            return False
    return True


# --------------------------------------------------------------------------- the API


class MarathonAPI:
    """Request handlers; one instance per control plane."""

    def __init__(self, scheduler: SchedulerAPI, events: EventBus) -> None:
        self.scheduler = scheduler
        self.events = events
        self.event_stream = EventStreamEndpoint(events)

    def __repr__(self) -> str:
        return f"<MarathonAPI apps={len(self.scheduler.apps())} {self.events!r}>"

    def _require_app(self, app_id: str) -> AppDefinition:
        app = self.scheduler.app(app_id)
        if app is None:
            raise ApiError(404, f"App '{app_id}' does not exist")
        return app

    def _post_event(self, request: Request, app: AppDefinition) -> None:
        client = request.client.host if request.client else ""
        self.events.publish(
            "api_post_event",
            {"clientIp": client, "uri": request.url.path, "appDefinition": render_app(app)},
        )

    # ---- misc

    async def ping(self, request: Request) -> Response:
        return PlainTextResponse("pong")

    async def usage(self, request: Request) -> Response:
        return JSONResponse(await asyncio.to_thread(self.scheduler.usage))

    async def info(self, request: Request) -> Response:
        server = request.scope.get("server") or ("127.0.0.1", 0)
        leader = f"{server[0]}:{server[1]}"
        return JSONResponse(render_info(version=__version__, leader=leader, http_port=server[1]))

    async def leader(self, request: Request) -> Response:
        server = request.scope.get("server") or ("127.0.0.1", 0)
        return JSONResponse({"leader": f"{server[0]}:{server[1]}"})

    # ---- apps

    async def list_apps(self, request: Request) -> Response:
        embed = parse_embed(request.query_params.getlist("embed")) | {"counts", "deployments"}
        id_filter = request.query_params.get("id")
        cmd_filter = request.query_params.get("cmd")
        label = request.query_params.get("label")
        apps = []
        for app in sorted(self.scheduler.apps(), key=lambda a: a.id):
            if id_filter and id_filter.lower() not in app.id.lower():
                continue
            if cmd_filter and cmd_filter not in (app.cmd or ""):
                continue
            if label and not label_matches(label, app.labels):
                continue
            apps.append(render_app(app, self.scheduler.status(app.id), embed))
        return JSONResponse({"apps": apps})

    async def create_app(self, request: Request) -> Response:
        doc = await _json_body(request)
        app = parse_app(doc)
        deployment = await self.scheduler.create_app(app)
        self._post_event(request, app)
        body = render_app(app, self.scheduler.status(app.id), {"counts", "deployments", "tasks"})
        # The deployment may already be gone from status; the response names it anyway.
        body["deployments"] = [{"id": deployment.id}]
        return JSONResponse(
            body,
            status_code=201,
            headers={"Location": f"/v2/apps{app.id}", DEPLOYMENT_HEADER: deployment.id},
        )

    async def app_or_list(self, request: Request) -> Response:
        if _app_id(request) == "/":
            return await self.list_apps(request)
        return await self.get_app(request)

    async def get_app(self, request: Request) -> Response:
        app = self._require_app(_app_id(request))
        embed = parse_embed(request.query_params.getlist("embed")) | {
            "counts",
            "deployments",
            "tasks",
            "lastTaskFailure",
        }
        return JSONResponse({"app": render_app(app, self.scheduler.status(app.id), embed)})

    async def put_app(self, request: Request) -> Response:
        app_id = _app_id(request)
        force = _flag(request, "force")
        doc = await _json_body(request)
        if not isinstance(doc, dict):
            raise ValidationFailed([{"path": "/", "errors": ["expected a JSON object"]}])
        current = self.scheduler.app(app_id)
        if current is None:
            # Marathon creates the app when PUT names one that does not exist.
            app = parse_app(doc, app_id=app_id)
            deployment = await self.scheduler.create_app(app)
            self._post_event(request, app)
            response = _deployment_result(deployment, 201)
            response.headers["Location"] = f"/v2/apps{app.id}"
            return response
        # partialUpdate=false replaces the whole definition (Marathon >= 1.5).
        app = merge_app(current, doc, partial=_flag(request, "partialUpdate", True))
        deployment = await self.scheduler.update_app(app, force)
        self._post_event(request, app)
        return _deployment_result(deployment)

    async def delete_app(self, request: Request) -> Response:
        app_id = _app_id(request)
        force = _flag(request, "force")
        self._require_app(app_id)
        return _deployment_result(await self.scheduler.delete_app(app_id, force))

    async def restart_app(self, request: Request) -> Response:
        app_id = _app_id(request)
        force = _flag(request, "force")
        self._require_app(app_id)
        return _deployment_result(await self.scheduler.restart_app(app_id, force))

    async def app_versions(self, request: Request) -> Response:
        # Only the current version is kept; Marathon keeps a history of them.
        app = self._require_app(_app_id(request))
        return JSONResponse({"versions": [app.version]})

    async def app_version(self, request: Request) -> Response:
        app = self._require_app(_app_id(request))
        version = str(request.path_params["version"])
        if version != app.version:
            raise ApiError(404, f"App '{app.id}' has no version {version} (only the current one)")
        return JSONResponse(render_app(app))

    # ---- groups (read-only: berth's groups are implied by app ids)

    async def get_group(self, request: Request) -> Response:
        group_id = normalize_id(str(request.path_params.get("group_id", "")))
        embed = parse_embed(request.query_params.getlist("embed")) | {"counts", "deployments"}
        apps = [
            render_app(app, self.scheduler.status(app.id), embed)
            for app in sorted(self.scheduler.apps(), key=lambda a: a.id)
        ]
        version = max((str(a["version"]) for a in apps), default=now_timestamp())
        group = render_group(group_id, apps, version=version)
        if group is None:
            raise ApiError(404, f"Group '{group_id}' does not exist")
        return JSONResponse(group)

    # ---- tasks

    def _tasks_response(self, request: Request, tasks: Sequence[TaskView]) -> Response:
        apps = {a.id: a for a in self.scheduler.apps()}
        if _wants_text(request):
            grouped: dict[str, list[TaskView]] = {}
            for task in tasks:
                grouped.setdefault(task.app_id, []).append(task)
            pairs = [(apps[i], grouped.get(i, [])) for i in sorted(apps) if i in grouped]
            return PlainTextResponse(render_tasks_text(pairs))
        return JSONResponse({"tasks": [render_task(t, apps.get(t.app_id)) for t in tasks]})

    async def app_tasks(self, request: Request) -> Response:
        app = self._require_app(_app_id(request))
        tasks = self.scheduler.tasks(app.id)
        if _wants_text(request):
            return PlainTextResponse(render_tasks_text([(app, tasks)]))
        return JSONResponse({"tasks": [render_task(t, app) for t in tasks]})

    async def all_tasks(self, request: Request) -> Response:
        wanted: set[str] = set()
        for status in request.query_params.getlist("status"):
            if status.lower() not in TASK_STATUSES:
                raise ApiError(
                    400, f"Invalid status {status!r}: use one of {', '.join(TASK_STATUSES)}"
                )
            wanted.add(TASK_STATUSES[status.lower()])
        tasks = [t for t in self.scheduler.tasks() if not wanted or t.state.value in wanted]
        return self._tasks_response(request, tasks)

    async def _kill(self, request: Request, task_ids: list[str], single: bool) -> Response:
        scale = _flag(request, "scale")
        wipe = _flag(request, "wipe")
        result = await self.scheduler.kill_tasks(task_ids, scale, wipe)
        if not isinstance(result, Sequence):
            return _deployment_result(result)
        apps = {a.id: a for a in self.scheduler.apps()}
        rendered = [render_task(t, apps.get(t.app_id)) for t in result]
        if single:
            if not rendered:
                raise ApiError(404, f"Task '{task_ids[0]}' does not exist")
            return JSONResponse({"task": rendered[0]})
        return JSONResponse({"tasks": rendered})

    async def kill_app_tasks(self, request: Request) -> Response:
        app = self._require_app(_app_id(request))
        host = request.query_params.get("host")
        ids = [t.id for t in self.scheduler.tasks(app.id) if host in (None, "", "*", t.host)]
        return await self._kill(request, ids, single=False)

    async def kill_app_task(self, request: Request) -> Response:
        app = self._require_app(_app_id(request))
        task_id = str(request.path_params["task_id"])
        if task_id not in {t.id for t in self.scheduler.tasks(app.id)}:
            raise ApiError(404, f"Task '{task_id}' does not exist")
        return await self._kill(request, [task_id], single=True)

    async def delete_tasks(self, request: Request) -> Response:
        doc = await _json_body(request)
        ids = doc.get("ids") if isinstance(doc, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ApiError(422, 'Expected a body like {"ids": ["task-id", ...]}')
        known = {t.id for t in self.scheduler.tasks()}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ApiError(404, f"Task '{unknown[0]}' does not exist")
        return await self._kill(request, ids, single=False)

    # ---- deployments and queue

    async def list_deployments(self, request: Request) -> Response:
        return JSONResponse([render_deployment(d) for d in self.scheduler.deployments()])

    def _require_deployment(self, deployment_id: str) -> DeploymentView:
        for deployment in self.scheduler.deployments():
            if deployment.id == deployment_id:
                return deployment
        raise ApiError(404, f"DeploymentPlan {deployment_id} does not exist")

    async def get_deployment(self, request: Request) -> Response:
        return JSONResponse(
            render_deployment(self._require_deployment(str(request.path_params["deployment_id"])))
        )

    async def delete_deployment(self, request: Request) -> Response:
        deployment_id = str(request.path_params["deployment_id"])
        force = _flag(request, "force")
        self._require_deployment(deployment_id)
        rollback = await self.scheduler.cancel_deployment(deployment_id, force)
        if force or rollback is None:
            return Response(status_code=202)
        return _deployment_result(rollback)

    async def get_queue(self, request: Request) -> Response:
        return JSONResponse(render_queue(self.scheduler.queue(), self.scheduler.app))

    async def reset_delay(self, request: Request) -> Response:
        app = self._require_app(_app_id(request))
        await self.scheduler.reset_delay(app.id)
        return Response(status_code=204)


# --------------------------------------------------------------------------- errors


def _error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, ApiError):
        return JSONResponse(exc.body, status_code=exc.status)
    if isinstance(exc, ValidationFailed):
        return JSONResponse(exc.body(), status_code=422)
    if isinstance(exc, errors.UnsupportedApp):
        body = {
            "message": "Object is not valid",
            "details": [{"path": exc.path, "errors": [exc.message]}],
        }
        return JSONResponse(body, status_code=422)
    if isinstance(exc, errors.AppLocked):
        body = {"message": str(exc), "deployments": [{"id": i} for i in exc.deployment_ids]}
        return JSONResponse(body, status_code=409)
    if isinstance(exc, errors.AppExists):
        return JSONResponse({"message": str(exc)}, status_code=409)
    if isinstance(exc, errors.UnknownApp | errors.UnknownTask | errors.UnknownDeployment):
        return JSONResponse({"message": str(exc)}, status_code=404)
    if isinstance(exc, HTTPException):
        return JSONResponse({"message": exc.detail}, status_code=exc.status_code)
    if isinstance(exc, StoreUnavailable):
        # A dependency is down, not a bug: 503 tells clients to come back.
        log.warning("Marathon API: store unavailable: %s", exc)
        body = {"message": f"the store is unavailable: {exc}"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    log.exception("unexpected error in the Marathon API", exc_info=exc)
    return JSONResponse({"message": f"internal error: {type(exc).__name__}"}, status_code=500)


Handler = Callable[[Request], Awaitable[Response]]


def _guarded(handler: Handler, ready: Callable[[], Awaitable[None]] | None = None) -> Handler:
    """Every failure becomes a Marathon JSON error; the server never drops the request.

    With ``ready``, the handler first waits (bounded) for the scheduler to have
    loaded its state: before that, reads would show no apps and writes would
    race recovery. Marathon answers 503 while it has no elected leader.
    """

    async def run(request: Request) -> Response:
        try:
            if ready is not None:
                try:
                    async with asyncio.timeout(READY_TIMEOUT_SECONDS):
                        await ready()
                except TimeoutError:
                    raise ApiError(
                        503, "the scheduler is still loading its state from the store; retry"
                    ) from None
            return await handler(request)
        except Exception as exc:
            return _error_response(exc)

    return run


def build_app(api: MarathonAPI) -> Starlette:
    def route(path: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, _guarded(handler, api.scheduler.wait_ready), methods=methods)

    def open_route(path: str, handler: Handler, methods: list[str]) -> Route:
        return Route(path, _guarded(handler), methods=methods)

    routes = [
        open_route("/ping", api.ping, ["GET", "HEAD"]),
        open_route("/v2/info", api.info, ["GET"]),
        open_route("/v2/leader", api.leader, ["GET"]),
        route("/v2/apps", api.list_apps, ["GET"]),
        route("/v2/apps", api.create_app, ["POST"]),
        route("/v2/apps/{app_id:path}/restart", api.restart_app, ["POST"]),
        route("/v2/apps/{app_id:path}/versions/{version}", api.app_version, ["GET"]),
        route("/v2/apps/{app_id:path}/versions", api.app_versions, ["GET"]),
        route("/v2/apps/{app_id:path}/tasks/{task_id}", api.kill_app_task, ["DELETE"]),
        route("/v2/apps/{app_id:path}/tasks", api.app_tasks, ["GET"]),
        route("/v2/apps/{app_id:path}/tasks", api.kill_app_tasks, ["DELETE"]),
        route("/v2/apps/{app_id:path}", api.app_or_list, ["GET"]),
        route("/v2/apps/{app_id:path}", api.put_app, ["PUT"]),
        route("/v2/apps/{app_id:path}", api.delete_app, ["DELETE"]),
        route("/v2/groups", api.get_group, ["GET"]),
        route("/v2/groups/{group_id:path}", api.get_group, ["GET"]),
        route("/v2/tasks", api.all_tasks, ["GET"]),
        route("/v2/tasks/delete", api.delete_tasks, ["POST"]),
        route("/v2/deployments", api.list_deployments, ["GET"]),
        route("/v2/deployments/{deployment_id}", api.get_deployment, ["GET"]),
        route("/v2/deployments/{deployment_id}", api.delete_deployment, ["DELETE"]),
        route("/v2/queue", api.get_queue, ["GET"]),
        route("/v2/queue/{app_id:path}/delay", api.reset_delay, ["DELETE"]),
        Route("/v2/events", api.event_stream),
        route("/api/scheduler/usage", api.usage, ["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        return _error_response(exc)

    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error},
    )


# --------------------------------------------------------------------------- component


class SchedulerComponent:
    """The scheduler as a control-plane component: ``/v2/*``, ``/ping`` and
    berth's own ``/api/scheduler/*``.

    ``start()`` must not wait for the store: with the embedded store the control
    plane only serves it after every component has started, so the core loads
    its state in the background.
    """

    prefixes: tuple[str, ...] = ("/v2/", "/ping", "/api/scheduler/")

    def __init__(self, config: SchedulerConfig, store_url: str, token: str | None = None) -> None:
        from berth.scheduler.core import Scheduler

        self.config = config
        self.events = EventBus()
        self.store = StoreClient(store_url, token)
        self.scheduler = Scheduler(config, self.store, self.events)
        self.api = MarathonAPI(self.scheduler, self.events)
        self._app = build_app(self.api)

    def __repr__(self) -> str:
        return f"<SchedulerComponent store={self.store.url} {self.scheduler!r}>"

    async def start(self) -> None:
        await self.scheduler.start()

    def drain(self) -> None:
        # Open SSE connections would hold the HTTP server's drain until its
        # graceful timeout; end them while the server still serves.
        self.events.close()

    async def stop(self) -> None:
        self.events.close()
        try:
            await self.scheduler.stop()
        finally:
            await self.store.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
