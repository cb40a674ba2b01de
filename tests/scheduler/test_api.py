"""Routing, status codes and bodies of the Marathon API over a small in-test scheduler.

These check the API layer alone (the brief allows a fake scheduler here only);
test_api_real.py and test_marathon_client.py run the real Scheduler and processes.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from berth.scheduler import errors
from berth.scheduler.api import MarathonAPI, build_app, label_matches
from berth.scheduler.events import EventBus
from berth.scheduler.models import AppDefinition, with_instances


class State(enum.Enum):
    STAGING = "TASK_STAGING"
    RUNNING = "TASK_RUNNING"


@dataclass
class Task:
    id: str
    app_id: str
    host: str = "127.0.0.1"
    ports: list[int] = field(default_factory=lambda: [10001])
    state: State = State.RUNNING
    staged_at: str = "2026-01-01T00:00:00.000Z"
    started_at: str | None = "2026-01-01T00:00:01.000Z"
    version: str = "2026-01-01T00:00:00.000Z"
    health: list[Any] = field(default_factory=list)


@dataclass
class Deployment:
    id: str
    version: str
    affected_apps: list[str]
    steps: list[list[tuple[str, str]]]
    current_step: int = 1
    total_steps: int = 1


@dataclass
class Status:
    tasks: list[Task]
    staged: int
    running: int
    healthy: int
    unhealthy: int
    deployments: list[Deployment]
    last_task_failure: dict[str, Any] | None = None


@dataclass
class Entry:
    app_id: str
    count: int
    delay_until: float | None
    since: str


class FakeScheduler:
    """Applies changes at once and records a deployment per change, kept until told."""

    def __init__(self) -> None:
        self._apps: dict[str, AppDefinition] = {}
        self._tasks: dict[str, list[Task]] = {}
        self._deployments: list[Deployment] = []
        self._ids = itertools.count(1)
        self.locked = False
        self.delays_reset: list[str] = []
        self.ready = asyncio.Event()
        self.ready.set()

    async def wait_ready(self) -> None:
        await self.ready.wait()

    def _deploy(self, action: str, app: AppDefinition) -> Deployment:
        deployment = Deployment(
            f"dep-{next(self._ids)}", app.version, [app.id], [[(action, app.id)]]
        )
        if self.locked:
            self._deployments.append(deployment)
        return deployment

    def _sync(self, app: AppDefinition) -> None:
        tasks = self._tasks.setdefault(app.id, [])
        while len(tasks) < app.instances:
            tasks.append(Task(f"{app.id[1:]}.instance-{next(self._ids)}", app.id))
        del tasks[app.instances :]

    def _check_lock(self, app_id: str, force: bool) -> None:
        blocking = [d.id for d in self._deployments if app_id in d.affected_apps]
        if blocking and not force:
            raise errors.AppLocked(blocking)

    def apps(self) -> list[AppDefinition]:
        return list(self._apps.values())

    def app(self, app_id: str) -> AppDefinition | None:
        return self._apps.get(app_id)

    def status(self, app_id: str) -> Status:
        tasks = self._tasks.get(app_id, [])
        deps = [d for d in self._deployments if app_id in d.affected_apps]
        return Status(tasks, 0, len(tasks), 0, 0, deps)

    def tasks(self, app_id: str | None = None) -> list[Task]:
        if app_id is None:
            return [t for ts in self._tasks.values() for t in ts]
        return list(self._tasks.get(app_id, []))

    def deployments(self) -> list[Deployment]:
        return list(self._deployments)

    def queue(self) -> list[Entry]:
        return [Entry(a, 1, 1e18, "2026-01-01T00:00:00.000Z") for a in self._apps]

    async def create_app(self, app: AppDefinition) -> Deployment:
        if app.id in self._apps:
            raise errors.AppExists(app.id)
        if app.container_image:
            raise errors.UnsupportedApp("/container", "the process driver cannot run images")
        self._apps[app.id] = app
        self._sync(app)
        return self._deploy("StartApplication", app)

    async def update_app(self, app: AppDefinition, force: bool) -> Deployment:
        self._check_lock(app.id, force)
        self._apps[app.id] = app
        self._sync(app)
        return self._deploy("ScaleApplication", app)

    async def delete_app(self, app_id: str, force: bool) -> Deployment:
        self._check_lock(app_id, force)
        app = self._apps.pop(app_id)
        self._tasks.pop(app_id, None)
        return self._deploy("StopApplication", app)

    async def restart_app(self, app_id: str, force: bool) -> Deployment:
        self._check_lock(app_id, force)
        return self._deploy("RestartApplication", self._apps[app_id])

    async def kill_tasks(
        self, task_ids: list[str], scale: bool, wipe: bool = False
    ) -> Sequence[Task] | Deployment:
        killed = [t for t in self.tasks() if t.id in task_ids]
        for task in killed:
            self._tasks[task.app_id].remove(task)
        if scale:
            app = self._apps[killed[0].app_id]
            app = with_instances(app, app.instances - len(killed))
            self._apps[app.id] = app
            return self._deploy("ScaleApplication", app)
        return killed

    async def cancel_deployment(self, deployment_id: str, force: bool) -> Deployment | None:
        self._deployments = [d for d in self._deployments if d.id != deployment_id]
        return None if force else Deployment("rollback-1", "v", [], [])

    async def reset_delay(self, app_id: str) -> None:
        self.delays_reset.append(app_id)


@pytest.fixture
def scheduler() -> FakeScheduler:
    return FakeScheduler()


@pytest.fixture
async def client(scheduler: FakeScheduler) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(MarathonAPI(scheduler, EventBus()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://berth") as http:
        yield http


APP = {"id": "web", "cmd": "python3 -m http.server $PORT0", "instances": 2}


async def test_ping_info_leader(client: httpx.AsyncClient) -> None:
    r = await client.get("/ping")
    assert (r.status_code, r.text) == (200, "pong")
    assert r.headers["content-type"].startswith("text/plain")
    info = (await client.get("/v2/info")).json()
    assert info["elected"] is True and "marathon_config" in info
    assert "leader" in (await client.get("/v2/leader")).json()


async def test_create_get_list(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/apps", json=APP)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == "/v2/apps/web"
    assert r.headers["marathon-deployment-id"].startswith("dep-")
    body = r.json()
    assert body["id"] == "/web" and body["deployments"] == [
        {"id": r.headers["marathon-deployment-id"]}
    ]

    r = await client.get("/v2/apps//web")
    assert r.status_code == 200
    app = r.json()["app"]
    assert app["tasksRunning"] == 2 and len(app["tasks"]) == 2

    apps = (await client.get("/v2/apps")).json()["apps"]
    assert [a["id"] for a in apps] == ["/web"]
    assert "tasks" not in apps[0] and apps[0]["tasksRunning"] == 2
    apps = (await client.get("/v2/apps?embed=apps.tasks")).json()["apps"]
    assert len(apps[0]["tasks"]) == 2
    assert (await client.get("/v2/apps?id=nope")).json() == {"apps": []}


async def test_create_errors(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/apps", content=b"{nope")
    assert r.status_code == 400 and r.json()["message"].startswith("Invalid JSON")
    r = await client.post("/v2/apps", content=b"")
    assert r.status_code == 400
    r = await client.post("/v2/apps", json={"id": "Bad_Id", "cmd": "x"})
    assert r.status_code == 422
    assert r.json()["details"][0]["path"] == "/id"
    r = await client.post("/v2/apps", json={"id": "x"})
    assert r.status_code == 422
    assert (await client.post("/v2/apps", json=APP)).status_code == 201
    r = await client.post("/v2/apps", json=APP)
    assert r.status_code == 409 and "already exists" in r.json()["message"]
    r = await client.post(
        "/v2/apps", json={"id": "img", "container": {"docker": {"image": "nginx"}}}
    )
    assert r.status_code == 422
    assert r.json()["details"] == [
        {"path": "/container", "errors": ["the process driver cannot run images"]}
    ]
    r = await client.post("/v2/apps", content=b"x" * (2 * 1024 * 1024))
    assert r.status_code == 413


async def test_unknown_app_is_404(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/v2/apps/x"),
        ("DELETE", "/v2/apps/x"),
        ("POST", "/v2/apps/x/restart"),
        ("GET", "/v2/apps/x/tasks"),
        ("DELETE", "/v2/apps/x/tasks/x.1"),
        ("DELETE", "/v2/queue/x/delay"),
    ]:
        r = await client.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.json() == {"message": "App '/x' does not exist"}


async def test_put_merges_and_creates(client: httpx.AsyncClient, scheduler: FakeScheduler) -> None:
    r = await client.put("/v2/apps/fresh", json={"cmd": "sleep 100"})
    assert r.status_code == 201 and set(r.json()) == {"deploymentId", "version"}
    assert scheduler.app("/fresh") is not None
    r = await client.put("/v2/apps//fresh?force=False", json={"instances": 3})
    assert r.status_code == 200
    assert r.headers["marathon-deployment-id"] == r.json()["deploymentId"]
    app = scheduler.app("/fresh")
    assert app is not None and app.instances == 3 and app.cmd == "sleep 100"
    r = await client.put("/v2/apps/fresh", json={"instances": -1})
    assert r.status_code == 422 and scheduler.app("/fresh") == app
    r = await client.put("/v2/apps/fresh", json=[1])
    assert r.status_code == 422
    r = await client.put("/v2/apps/fresh?force=maybe", json={"instances": 1})
    assert r.status_code == 400 and "force" in r.json()["message"]


async def test_locks_and_force(client: httpx.AsyncClient, scheduler: FakeScheduler) -> None:
    scheduler.locked = True
    r = await client.post("/v2/apps", json=APP)
    dep = r.headers["marathon-deployment-id"]
    r = await client.put("/v2/apps/web", json={"instances": 1})
    assert r.status_code == 409
    assert r.json()["deployments"] == [{"id": dep}]
    assert "force=true" in r.json()["message"]
    assert (await client.post("/v2/apps/web/restart")).status_code == 409
    assert (await client.delete("/v2/apps/web")).status_code == 409
    assert (await client.put("/v2/apps/web?force=True", json={"instances": 1})).status_code == 200
    deployments = (await client.get("/v2/deployments")).json()
    assert dep in [d["id"] for d in deployments]
    assert deployments[0]["steps"][0]["actions"][0] == {"action": "StartApplication", "app": "/web"}
    assert (await client.get(f"/v2/deployments/{dep}")).json()["id"] == dep
    r = await client.delete(f"/v2/deployments/{dep}")
    assert r.status_code == 200 and r.json()["deploymentId"] == "rollback-1"
    other = deployments[-1]["id"]
    r = await client.delete(f"/v2/deployments/{other}?force=true")
    assert r.status_code == 202 and r.content == b""
    r = await client.delete("/v2/deployments/nope")
    assert r.status_code == 404 and r.json()["message"] == "DeploymentPlan nope does not exist"


async def test_tasks_endpoints(client: httpx.AsyncClient, scheduler: FakeScheduler) -> None:
    await client.post("/v2/apps", json=APP)
    tasks = (await client.get("/v2/apps/web/tasks")).json()["tasks"]
    assert len(tasks) == 2 and tasks[0]["appId"] == "/web"
    text = await client.get("/v2/apps/web/tasks", headers={"Accept": "text/plain"})
    assert text.text.startswith("web\t0\t127.0.0.1:10001\t")
    assert len((await client.get("/v2/tasks?status=running")).json()["tasks"]) == 2
    assert (await client.get("/v2/tasks?status=staging")).json()["tasks"] == []
    assert (await client.get("/v2/tasks?status=bogus")).status_code == 400

    r = await client.delete(f"/v2/apps/web/tasks/{tasks[0]['id']}?scale=false")
    assert r.status_code == 200 and r.json()["task"]["id"] == tasks[0]["id"]
    r = await client.delete(f"/v2/apps/web/tasks/{tasks[0]['id']}")
    assert r.status_code == 404
    r = await client.delete(f"/v2/apps/web/tasks/{tasks[1]['id']}?scale=True&wipe=False")
    assert r.status_code == 200 and "deploymentId" in r.json()
    app = scheduler.app("/web")
    assert app is not None and app.instances == 1

    await client.put("/v2/apps/web", json={"instances": 3})
    r = await client.delete("/v2/apps/web/tasks?scale=false")
    assert len(r.json()["tasks"]) == 3

    await client.put("/v2/apps/web", json={"instances": 2})
    ids = [t["id"] for t in (await client.get("/v2/tasks")).json()["tasks"]]
    r = await client.post("/v2/tasks/delete", json={"ids": ids[:1]})
    assert r.status_code == 200 and [t["id"] for t in r.json()["tasks"]] == ids[:1]
    assert (await client.post("/v2/tasks/delete", json={"ids": ["nope"]})).status_code == 404
    assert (await client.post("/v2/tasks/delete", json={"ids": "x"})).status_code == 422


async def test_queue_and_delay(client: httpx.AsyncClient, scheduler: FakeScheduler) -> None:
    await client.post("/v2/apps", json=APP)
    queue = (await client.get("/v2/queue")).json()["queue"]
    assert queue[0]["app"]["id"] == "/web" and queue[0]["delay"]["overdue"] is False
    assert (await client.delete("/v2/queue//web/delay")).status_code == 204
    assert scheduler.delays_reset == ["/web"]


async def test_restart_and_delete(client: httpx.AsyncClient, scheduler: FakeScheduler) -> None:
    await client.post("/v2/apps", json=APP)
    r = await client.post("/v2/apps/web/restart?force=true")
    assert r.status_code == 200 and "deploymentId" in r.json()
    r = await client.delete("/v2/apps/web")
    assert r.status_code == 200 and scheduler.app("/web") is None


async def test_events_need_event_stream_accept(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/events")
    assert r.status_code == 405 and "text/event-stream" in r.json()["message"]
    r = await client.get("/v2/events?event_type=nope", headers={"Accept": "text/event-stream"})
    assert r.status_code == 400


async def test_wrong_method_is_json(client: httpx.AsyncClient) -> None:
    r = await client.patch("/v2/apps/web")
    assert r.status_code == 405 and "message" in r.json()


@pytest.mark.parametrize(
    ("selector", "ok"),
    [
        ("tier", True),
        ("tier==web", True),
        ("tier!=web", False),
        ("tier==web, env in (prod, dev)", True),
        ("env notin (prod)", False),
        ("missing", False),
    ],
)
def test_label_selector(selector: str, ok: bool) -> None:
    assert label_matches(selector, {"tier": "web", "env": "prod"}) is ok


async def test_label_filter(client: httpx.AsyncClient) -> None:
    await client.post("/v2/apps", json={**APP, "labels": {"tier": "web"}})
    await client.post("/v2/apps", json={"id": "db", "cmd": "x", "instances": 0})
    apps = (await client.get("/v2/apps", params={"label": "tier==web"})).json()["apps"]
    assert [a["id"] for a in apps] == ["/web"]
    apps = (await client.get("/v2/apps", params={"cmd": "http.server"})).json()["apps"]
    assert [a["id"] for a in apps] == ["/web"]


def test_repr(scheduler: FakeScheduler) -> None:
    assert repr(MarathonAPI(scheduler, EventBus())) == (
        "<MarathonAPI apps=0 <EventBus subscribers=0 published=0>>"
    )


async def test_partial_update_false_replaces(
    client: httpx.AsyncClient, scheduler: FakeScheduler
) -> None:
    await client.post("/v2/apps", json={**APP, "env": {"K": "v"}})
    r = await client.put("/v2/apps/web?partialUpdate=false", json={"cmd": "sleep 1"})
    assert r.status_code == 200
    app = scheduler.app("/web")
    assert app is not None and app.env == {} and app.instances == 1 and app.cmd == "sleep 1"


async def test_deeply_nested_json_is_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/apps", content=b"[" * 100_000)
    assert r.status_code == 400 and r.json()["message"].startswith("Invalid JSON")


async def test_sse_frames_heartbeats_and_detach(scheduler: FakeScheduler) -> None:
    bus = EventBus()
    api = MarathonAPI(scheduler, bus)
    api.event_stream.heartbeat_seconds = 0.05
    assert repr(api.event_stream).startswith("<EventStreamEndpoint heartbeat=0.05s <EventBus")
    app = build_app(api)
    gone = asyncio.Event()
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    async def next_body(predicate: Any) -> bytes:
        while True:
            message = await asyncio.wait_for(sent.get(), 10)
            if predicate(message.get("body", b"")):
                return bytes(message["body"])

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v2/events",
        "raw_path": b"/v2/events",
        "query_string": b"event_type=deployment_success&event_type=event_stream_attached",
        "headers": [(b"accept", b"text/event-stream")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
        "scheme": "http",
        "root_path": "",
        "http_version": "1.1",
    }
    watcher = bus.subscribe({"event_stream_detached"})
    stream = asyncio.create_task(app(scope, receive, send))
    start = await asyncio.wait_for(sent.get(), 10)
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream") in start["headers"]
    attached = await next_body(lambda b: b.startswith(b"event: "))
    assert attached.startswith(b"event: event_stream_attached\ndata: {")
    await next_body(lambda b: b == b":\n\n")
    bus.publish("status_update_event", {"taskId": "filtered-out"})
    bus.publish("deployment_success", {"id": "d1"})
    frame = await next_body(lambda b: b.startswith(b"event: "))
    assert frame.startswith(b"event: deployment_success\ndata: ")
    assert json.loads(frame.split(b"data: ", 1)[1])["id"] == "d1"
    gone.set()
    await asyncio.wait_for(stream, 10)
    detached = await asyncio.wait_for(anext(watcher), 10)
    assert detached["remoteAddress"] == "127.0.0.1"
    assert bus.subscriber_count == 1


async def test_not_ready_is_503_after_a_bounded_wait(
    client: httpx.AsyncClient, scheduler: FakeScheduler, monkeypatch: pytest.MonkeyPatch
) -> None:
    from berth.scheduler import api

    monkeypatch.setattr(api, "READY_TIMEOUT_SECONDS", 0.01)
    scheduler.ready.clear()
    r = await client.get("/v2/apps")
    assert r.status_code == 503 and "loading" in r.json()["message"]
    assert (await client.get("/ping")).status_code == 200
    assert (await client.get("/v2/info")).status_code == 200


async def test_versions(client: httpx.AsyncClient) -> None:
    await client.post("/v2/apps", json=APP)
    (version,) = (await client.get("/v2/apps/web/versions")).json()["versions"]
    r = await client.get(f"/v2/apps/web/versions/{version}")
    assert r.status_code == 200 and r.json()["id"] == "/web" and r.json()["version"] == version
    assert (await client.get("/v2/apps/web/versions/2000-01-01T00:00:00.000Z")).status_code == 404


async def test_groups_are_implied_by_app_ids(client: httpx.AsyncClient) -> None:
    for app_id in ("top", "prod/web", "prod/db/main", "dev/web"):
        assert (await client.post("/v2/apps", json={**APP, "id": app_id})).status_code == 201
    root = (await client.get("/v2/groups")).json()
    assert root["id"] == "/" and [a["id"] for a in root["apps"]] == ["/top"]
    assert [g["id"] for g in root["groups"]] == ["/dev", "/prod"]
    prod = (await client.get("/v2/groups/prod")).json()
    assert [a["id"] for a in prod["apps"]] == ["/prod/web"]
    assert prod["groups"][0]["id"] == "/prod/db"
    assert prod["groups"][0]["apps"][0]["tasksRunning"] == 2
    assert (await client.get("/v2/groups//prod/db")).json()["apps"][0]["id"] == "/prod/db/main"
    r = await client.get("/v2/groups/nope")
    assert r.status_code == 404 and r.json() == {"message": "Group '/nope' does not exist"}
