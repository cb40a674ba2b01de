"""The Marathon API of a real ``berth server``: real scheduler, real task processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scheduler.api_support import (
    EventStream,
    api_client,
    berth_cli,
    never_healthy,
    port_open,
    running_server,
    tiny_app,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data: Path = tmp_path_factory.mktemp("api-real")
    with running_server(data) as proc:
        assert proc.url is not None
        yield proc.url


def _ports(app: dict[str, object]) -> list[int]:
    tasks = app["tasks"]
    assert isinstance(tasks, list)
    return [t["ports"][0] for t in tasks]


async def test_app_lifecycle(url: str) -> None:
    async with api_client(url) as http, EventStream(url) as events:
        r = await http.post("/v2/apps", json=tiny_app("life"))
        assert r.status_code == 201, r.text
        assert r.headers["location"] == "/v2/apps/life"
        dep = r.headers["marathon-deployment-id"]
        assert r.json()["deployments"] == [{"id": dep}]
        await events.wait_for("deployment_success", id=dep)
        posted = await events.wait_for("api_post_event", uri="/v2/apps")
        assert posted["appDefinition"]["id"] == "/life"

        app = (await http.get("/v2/apps/life")).json()["app"]
        assert (app["instances"], app["tasksRunning"], app["tasksHealthy"]) == (1, 1, 1)
        assert app["deployments"] == []
        (task,) = app["tasks"]
        assert task["state"] == "TASK_RUNNING" and task["healthCheckResults"][0]["alive"]
        assert (await http.get(f"http://127.0.0.1:{task['ports'][0]}/")).text == "ok"

        # The marathon client's scale path: double slash, force=False, partial body.
        r = await http.put("/v2/apps//life?force=False", json={"instances": 2})
        assert r.status_code == 200, r.text
        assert r.headers["marathon-deployment-id"] == r.json()["deploymentId"]
        await events.wait_for("deployment_success", id=r.json()["deploymentId"])
        app = (await http.get("/v2/apps/life")).json()["app"]
        assert app["tasksHealthy"] == 2 and "cmd" not in app
        assert app["versionInfo"]["lastConfigChangeAt"] < app["versionInfo"]["lastScalingAt"]
        ports = _ports(app)
        for port in ports:
            assert (await http.get(f"http://127.0.0.1:{port}/")).text == "ok"

        text = await http.get("/v2/apps/life/tasks", headers={"Accept": "text/plain"})
        assert text.text.startswith("life\t")
        assert sorted(int(e.split(":")[1]) for e in text.text.split("\t")[2:-1]) == sorted(ports)
        running = (await http.get("/v2/tasks", params={"status": "running"})).json()["tasks"]
        assert {t["appId"] for t in running} >= {"/life"}

        # Killing without scale: the scheduler replaces the task.
        old_ids = {t["id"] for t in app["tasks"]}
        victim = app["tasks"][0]["id"]
        r = await http.delete(f"/v2/apps/life/tasks/{victim}")
        assert r.status_code == 200 and r.json()["task"]["id"] == victim
        await events.wait_for("status_update_event", taskId=victim, taskStatus="TASK_KILLED")
        await events.wait_for(
            "health_status_changed_event",
            appId="/life",
            alive=True,
            where=lambda e: e["taskId"] not in old_ids,
        )

        r = await http.post("/v2/apps/life/restart")
        assert r.status_code == 200
        await events.wait_for("deployment_success", id=r.json()["deploymentId"])
        app = (await http.get("/v2/apps/life")).json()["app"]
        assert app["tasksHealthy"] == 2 and not old_ids & {t["id"] for t in app["tasks"]}
        ports = _ports(app)

        r = await http.delete("/v2/apps/life")
        assert r.status_code == 200
        await events.wait_for("deployment_success", id=r.json()["deploymentId"])
        r = await http.get("/v2/apps/life")
        assert r.status_code == 404 and r.json() == {"message": "App '/life' does not exist"}
    for port in ports:
        wait_until(lambda p=port: not port_open(p), what=f"port {port} to close")


async def test_locked_app_needs_force(url: str) -> None:
    async with api_client(url) as http, EventStream(url) as events:
        r = await http.post("/v2/apps", json=never_healthy("stuck"))
        assert r.status_code == 201
        dep = r.headers["marathon-deployment-id"]
        await events.wait_for("status_update_event", appId="/stuck", taskStatus="TASK_RUNNING")

        r = await http.put("/v2/apps/stuck", json={"instances": 2})
        assert r.status_code == 409
        assert r.json()["deployments"] == [{"id": dep}]
        assert (await http.post("/v2/apps/stuck/restart")).status_code == 409

        deployments = (await http.get("/v2/deployments")).json()
        (mine,) = [d for d in deployments if d["id"] == dep]
        assert mine["affectedApps"] == ["/stuck"] and mine["totalSteps"] >= 1
        assert (await http.get(f"/v2/deployments/{dep}")).json()["id"] == dep
        app = (await http.get("/v2/apps/stuck")).json()["app"]
        assert app["deployments"] == [{"id": dep}]

        r = await http.delete(f"/v2/deployments/{dep}?force=true")
        assert r.status_code == 202
        await events.wait_for("deployment_failed", id=dep)
        r = await http.put("/v2/apps/stuck?force=True", json={"instances": 0})
        assert r.status_code == 200
        await events.wait_for("deployment_success", id=r.json()["deploymentId"])
        r = await http.delete("/v2/apps/stuck?force=true")
        assert r.status_code == 200
        await events.wait_for("deployment_success", id=r.json()["deploymentId"])
        assert (await http.get("/v2/deployments/nope")).status_code == 404


async def test_scale_through_kill_and_task_delete(url: str) -> None:
    async with api_client(url) as http, EventStream(url) as events:
        r = await http.post("/v2/apps", json=tiny_app("shrink", 3))
        await events.wait_for("deployment_success", id=r.headers["marathon-deployment-id"])
        tasks = (await http.get("/v2/apps/shrink/tasks")).json()["tasks"]
        assert len(tasks) == 3
        r = await http.delete(f"/v2/apps/shrink/tasks/{tasks[0]['id']}?scale=True&wipe=False")
        assert r.status_code == 200 and "deploymentId" in r.json()
        r = await http.post("/v2/tasks/delete?scale=true", json={"ids": [tasks[1]["id"]]})
        assert r.status_code == 200 and "deploymentId" in r.json()
        await events.wait_for(
            "status_update_event", taskId=tasks[1]["id"], taskStatus="TASK_KILLED"
        )
        app = (await http.get("/v2/apps/shrink")).json()["app"]
        assert app["instances"] == 1
        assert [t["id"] for t in app["tasks"] if t["state"] == "TASK_RUNNING"] == [tasks[2]["id"]]
        r = await http.delete("/v2/apps/shrink")
        await events.wait_for("deployment_success", id=r.json()["deploymentId"])


async def test_errors_and_misc(url: str) -> None:
    async with api_client(url) as http:
        assert (await http.get("/ping")).text == "pong"
        info = (await http.get("/v2/info")).json()
        assert info["elected"] is True and info["http_config"]["http_port"] > 0
        r = await http.post("/v2/apps", content=b'{"id": ')
        assert r.status_code == 400 and r.json()["message"].startswith("Invalid JSON")
        r = await http.post("/v2/apps", json={"id": "x", "cmd": "true", "instances": -1})
        assert r.status_code == 422
        assert r.json()["details"][0]["path"] == "/instances"
        r = await http.post(
            "/v2/apps",
            json={"id": "img", "container": {"type": "DOCKER", "docker": {"image": "nginx"}}},
        )
        assert r.status_code == 422
        assert r.json()["details"][0]["path"] == "/container/docker/image"
        assert (await http.get("/v2/apps/img")).status_code == 404
        assert (await http.delete("/v2/apps/nope/tasks/nope.1")).status_code == 404
        assert (await http.get("/v2/queue")).json().keys() == {"queue"}
        r = await http.get("/v2/events")
        assert r.status_code == 405

        r = await http.post("/v2/apps", json=tiny_app("dup", 0))
        assert r.status_code == 201
        r = await http.post("/v2/apps", json=tiny_app("dup", 0))
        assert r.status_code == 409 and "already exists" in r.json()["message"]
        await http.delete("/v2/apps/dup?force=true")


async def test_event_stream_attach_detach(url: str) -> None:
    async with EventStream(url) as watcher:
        async with EventStream(url, ["api_post_event"]) as filtered:
            attached = await watcher.wait_for("event_stream_attached")
            assert attached["remoteAddress"] == "127.0.0.1"
            assert all(e["eventType"] == "api_post_event" for e in filtered.seen)
        await watcher.wait_for("event_stream_detached")


async def test_crashing_app_is_delayed_with_its_last_failure(url: str) -> None:
    crash = {
        "id": "crash",
        "cmd": "echo boom >&2; exit 3",
        "portDefinitions": [],
        "cpus": 0.1,
        "mem": 32,
        # Long enough that the app is surely still Delayed when we look.
        "backoffSeconds": 600,
    }
    async with api_client(url) as http, EventStream(url) as events:
        r = await http.post("/v2/apps", json=crash)
        assert r.status_code == 201
        first = await events.wait_for(
            "status_update_event", appId="/crash", taskStatus="TASK_FAILED"
        )

        app = (await http.get("/v2/apps/crash")).json()["app"]
        failure = app["lastTaskFailure"]
        assert (failure["appId"], failure["taskId"], failure["state"]) == (
            "/crash",
            first["taskId"],
            "TASK_FAILED",
        )
        queue = (await http.get("/v2/queue")).json()["queue"]
        (entry,) = [q for q in queue if q["app"]["id"] == "/crash"]
        assert entry["delay"]["overdue"] is False and entry["delay"]["timeLeftSeconds"] > 0

        r = berth_cli("status", url=url)
        (row,) = [line for line in r.stdout.splitlines() if line.startswith("/crash")]
        assert "Delayed" in row and "0 of 1" in row

        # Resetting the delay relaunches at once.
        assert (await http.delete("/v2/queue/crash/delay")).status_code == 204
        await events.wait_for(
            "status_update_event",
            appId="/crash",
            taskStatus="TASK_FAILED",
            where=lambda e: e["taskId"] != first["taskId"],
        )
        r = await http.delete("/v2/apps/crash?force=true")
        await events.wait_for("deployment_success", id=r.json()["deploymentId"])


async def test_app_without_health_checks_finishes_deploying(url: str) -> None:
    async with api_client(url) as http, EventStream(url) as events:
        r = await http.post("/v2/apps", json=tiny_app("nohealth", 2, health=False))
        assert r.status_code == 201
        try:
            await events.wait_for("deployment_success", id=r.headers["marathon-deployment-id"])
            app = (await http.get("/v2/apps/nohealth")).json()["app"]
            assert app["tasksRunning"] == 2 and app["tasksHealthy"] == 0
            assert all("healthCheckResults" not in t for t in app["tasks"])
        finally:
            await http.delete("/v2/apps/nohealth?force=true")


async def test_task_in_grace_period_is_not_counted_unhealthy(url: str) -> None:
    # Marathon ignores failed checks inside gracePeriodSeconds: such a task is
    # "unknown" in its UI, neither healthy nor unhealthy.
    async with api_client(url) as http, EventStream(url) as events:
        r = await http.post("/v2/apps", json=never_healthy("grace"))
        assert r.status_code == 201
        try:
            await events.wait_for("status_update_event", appId="/grace", taskStatus="TASK_RUNNING")
            app = (await http.get("/v2/apps/grace")).json()["app"]
            assert (app["tasksRunning"], app["tasksHealthy"], app["tasksUnhealthy"]) == (1, 0, 0)
        finally:
            r = await http.delete("/v2/apps/grace?force=true")
            await events.wait_for("deployment_success", id=r.json()["deploymentId"])
