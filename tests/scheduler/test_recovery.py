"""Control-plane restarts: state comes back from the store, tasks are never duplicated
and never left running unsupervised."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import psutil
import pytest

from berth.scheduler import models
from berth.scheduler.state import TASKS, app_key
from tests.scheduler.core_support import (
    SERVER,
    Events,
    await_until,
    control_plane,
    http_app,
    task_processes,
    wait_until,
)
from tests.support import BerthProcess
from tests.support import control_plane as berth_server

pytestmark = pytest.mark.slow


async def test_graceful_restart_stops_tasks_then_restores_without_duplicates(
    tmp_path: Path,
) -> None:
    async with control_plane(tmp_path) as plane:
        ev = Events(plane.events)
        dep = await plane.scheduler.create_app(http_app("/svc", instances=2))
        await ev.wait_for("deployment_success", id=dep.id)
        old = {t.id for t in plane.scheduler.tasks("/svc")}
        ev.close()
    # Stopped with the control plane: nothing of the app keeps running, nor the reaper.
    assert task_processes("/svc") == []
    children = psutil.Process().children(recursive=True)
    assert not [p for p in children if "reaper.py" in " ".join(p.cmdline())]

    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        assert sched.app("/svc") is not None and sched.app("/svc").instances == 2  # type: ignore[union-attr]
        await await_until(lambda: sched.status("/svc").healthy == 2, what="2 healthy tasks")
        new = {t.id for t in sched.tasks("/svc")}
        assert len(new) == 2 and not new & old
        assert len(task_processes("/svc")) == 2
        # Old tasks are gone from the store and the catalog (new ones may still be landing).
        stored = {k.removeprefix(TASKS) for k in await plane.store.kv_keys(TASKS)}
        assert stored <= new
        _, found = await plane.store.health_service("svc")
        assert {i.id for i in found} <= new


async def test_delete_interrupted_by_a_restart_completes_after_it(tmp_path: Path) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    app = models.parse_app(
        {
            "id": "/gone",
            "args": [sys.executable, "-c", stubborn],
            "taskKillGracePeriodSeconds": 600,
        }
    )
    async with control_plane(tmp_path, shutdown_grace_seconds=0.5) as plane:
        ev = Events(plane.events)
        dep = await plane.scheduler.create_app(app)
        await ev.wait_for("deployment_success", id=dep.id)
        await plane.scheduler.delete_app("/gone", force=False)
        (task,) = plane.scheduler.tasks("/gone")
        await ev.wait_for("status_update_event", taskId=task.id, taskStatus="TASK_KILLING")
        ev.close()
        # Shutdown does not wait out the 600 s grace period (shutdown_grace_seconds).
    assert task_processes("/gone") == []

    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        await await_until(lambda: sched.deployments() == [], what="the delete to finish")
        assert sched.app("/gone") is None and sched.tasks("/gone") == []
        assert await plane.store.kv_get(app_key("/gone")) is None
        assert task_processes("/gone") == []


def stop(server: BerthProcess) -> None:
    server.stop()
    # The output reader ends at EOF; then its pipe can be closed (no ResourceWarning).
    server._reader.join(10)
    if server.proc.stdout is not None:
        server.proc.stdout.close()


def servers(app_id: str) -> list[psutil.Process]:
    return [p for p in task_processes(app_id) if p.name().startswith("python")]


def counts(client: httpx.Client, app_id: str) -> tuple[int, int]:
    doc = client.get(f"/v2/apps{app_id}", params={"embed": "app.counts"}).json()["app"]
    return doc["tasksRunning"], doc["tasksHealthy"]


def test_killed_control_plane_leaves_no_orphans_and_recovers(tmp_path: Path) -> None:
    app = {
        "id": "/orphan",
        # A shell command: sh forks python, which PDEATHSIG alone would not reach.
        "cmd": f'{sys.executable} -c "$SERVER_CODE"',
        "env": {"SERVER_CODE": SERVER},
        "instances": 2,
        "cpus": 0.1,
        "mem": 128,
        "portDefinitions": [{"port": 0}],
        "healthChecks": [{"protocol": "TCP", "gracePeriodSeconds": 30, "intervalSeconds": 1}],
    }
    server = berth_server(tmp_path)
    try:
        url = server.wait_ready()
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/v2/apps", json=app).status_code == 201
            wait_until(lambda: counts(client, "/orphan") == (2, 2), what="2 healthy tasks")
            first = {t["id"] for t in client.get("/v2/apps/orphan/tasks").json()["tasks"]}
        assert len(servers("/orphan")) == 2  # each under its sh (dash forks it)
        server.kill()  # SIGKILL: no shutdown code runs
        wait_until(lambda: task_processes("/orphan") == [], what="tasks to die with it")
    finally:
        stop(server)

    server = berth_server(tmp_path)
    try:
        url = server.wait_ready()
        with httpx.Client(base_url=url, timeout=30) as client:
            wait_until(lambda: counts(client, "/orphan") == (2, 2), what="recovered tasks")
            tasks = client.get("/v2/apps/orphan/tasks").json()["tasks"]
            second = {t["id"] for t in tasks}
            assert len(second) == 2 and not second & first
            assert len(servers("/orphan")) == 2
            # The catalog lost the dead tasks and has exactly the new ones.
            found = client.get("/v1/health/service/orphan").json()
            assert {i["Service"]["ID"] for i in found} == second
    finally:
        stop(server)
    wait_until(lambda: task_processes("/orphan") == [], what="tasks to stop with berth server")
