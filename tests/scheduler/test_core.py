"""The scheduler core with real processes and the real embedded store."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from berth.scheduler import models
from berth.scheduler.errors import (
    AppExists,
    AppLocked,
    UnknownApp,
    UnknownDeployment,
    UnknownTask,
    UnsupportedApp,
)
from berth.scheduler.state import TaskState
from tests.scheduler.core_support import (
    RECORDS_CATALOG_ON_SIGTERM,
    Events,
    await_until,
    control_plane,
    http_app,
    task_processes,
)

pytestmark = pytest.mark.slow


async def passing(plane, service: str) -> set[str]:  # type: ignore[no-untyped-def]
    _, found = await plane.store.health_service(service, passing=True)
    return {i.id for i in found}


async def test_deploy_scale_up_and_down_with_catalog(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        dep = await sched.create_app(http_app("/web"))
        await ev.wait_for("deployment_success", id=dep.id)
        status = sched.status("/web")
        assert (status.running, status.healthy, status.deployments) == (1, 1, [])
        (task,) = status.tasks
        assert task.state is TaskState.RUNNING and task.pid and task.ports
        assert task.limits_in_force in ("cgroup-v2", "cgroup-v1", "rlimit")
        assert "RUNNING" in repr(task) and "healthy=True" in repr(task)
        assert "running apps=1 tasks=1" in repr(sched)
        assert await passing(plane, "web") == {task.id}
        # Its log is Docker json-file under <data-dir>/logs/tasks/<app>/<task>.log.
        assert (tmp_path / "logs" / "tasks" / "web" / f"{task.id}.log").exists()

        dep = await sched.update_app(models.with_instances(sched.app("/web"), 3), force=False)
        assert dep.steps == [[("ScaleApplication", "/web")]]
        await ev.wait_for("deployment_success", id=dep.id)
        assert sched.status("/web").healthy == 3
        ids = {t.id for t in sched.tasks("/web")}
        assert task.id in ids  # scaling keeps running tasks
        assert await passing(plane, "web") == ids

        dep = await sched.update_app(models.with_instances(sched.app("/web"), 1), force=False)
        await ev.wait_for("deployment_success", id=dep.id)
        (left,) = sched.tasks("/web")
        assert await passing(plane, "web") == {left.id}
        await await_until(lambda: len(task_processes("/web")) == 1, what="2 tasks to exit")

        dep = await sched.delete_app("/web", force=False)
        await ev.wait_for("app_terminated_event", appId="/web")
        assert sched.app("/web") is None
        assert await passing(plane, "web") == set()
        assert task_processes("/web") == []
        ev.close()


async def test_killed_task_is_replaced_and_scale_kill_shrinks(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        dep = await sched.create_app(http_app("/k", instances=2))
        await ev.wait_for("deployment_success", id=dep.id)
        before = {t.id for t in sched.tasks("/k")}
        victim = sched.tasks("/k")[0]
        mark = ev.mark()
        killed = await sched.kill_tasks([victim.id], scale=False)
        assert killed == [victim] and victim.state is TaskState.KILLING
        await ev.wait_for("status_update_event", taskId=victim.id, taskStatus="TASK_KILLED")
        # The replacement may turn healthy before the victim is gone (it drains first).
        await ev.wait_for(
            "health_status_changed_event",
            where=lambda e: e["taskId"] not in before,
            since=mark,
            alive=True,
        )
        await await_until(lambda: sched.status("/k").healthy == 2, what="replacement healthy")
        assert victim.id not in {t.id for t in sched.tasks("/k")}

        other = sched.tasks("/k")[0]
        dep = await sched.kill_tasks([other.id], scale=True)
        assert not isinstance(dep, list)
        await ev.wait_for("deployment_success", id=dep.id)
        assert sched.app("/k").instances == 1  # type: ignore[union-attr]
        assert [t.id for t in sched.tasks("/k")] != [other.id]
        with pytest.raises(UnknownTask):
            await sched.kill_tasks(["nope.1"], scale=False)
        ev.close()


async def test_task_leaves_the_catalog_before_it_gets_sigterm(tmp_path: Path) -> None:
    async with control_plane(tmp_path / "cp") as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        env = {"STORE": plane.url, "SVC": "drain", "OUT": str(tmp_path)}
        app = http_app("/drain", env=env, args=[sys.executable, "-c", RECORDS_CATALOG_ON_SIGTERM])
        dep = await sched.create_app(app)
        await ev.wait_for("deployment_success", id=dep.id)
        (task,) = sched.tasks("/drain")
        assert await passing(plane, "drain") == {task.id}
        await sched.kill_tasks([task.id], scale=False)
        await ev.wait_for("status_update_event", taskId=task.id, taskStatus="TASK_KILLED")
        seen_at_sigterm = json.loads((tmp_path / task.id).read_text())
        assert task.id not in {entry["Service"]["ID"] for entry in seen_at_sigterm}
        ev.close()


async def test_failing_health_check_kills_and_replaces(tmp_path: Path) -> None:
    flag = tmp_path / "healthy"
    flag.touch()
    async with control_plane(tmp_path / "cp") as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        dep = await sched.create_app(http_app("/sick", env={"HEALTH_FILE": str(flag)}))
        await ev.wait_for("deployment_success", id=dep.id)
        (first,) = sched.tasks("/sick")
        mark = ev.mark()
        flag.unlink()
        await ev.wait_for("failed_health_check_event", taskId=first.id)
        event = await ev.wait_for("unhealthy_task_kill_event", taskId=first.id)
        assert "HTTP 503" in event["reason"]
        # Out of the catalog before it is stopped.
        await ev.wait_for("status_update_event", taskId=first.id, taskStatus="TASK_KILLED")
        assert first.id not in await passing(plane, "sick")
        flag.touch()
        await ev.wait_for(
            "health_status_changed_event",
            where=lambda e: e["taskId"] != first.id,
            since=mark,
            alive=True,
        )
        (second,) = sched.tasks("/sick")
        assert second.id != first.id
        ev.close()


async def test_crashing_task_backs_off_and_shows_delayed(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        app = models.parse_app(
            {
                "id": "/crash",
                "cmd": "echo boom >&2; exit 7",
                "backoffSeconds": 30,
                "backoffFactor": 2,
                "maxLaunchDelaySeconds": 60,
            }
        )
        await sched.create_app(app)
        failed = await ev.wait_for("status_update_event", taskStatus="TASK_FAILED")
        assert failed["message"] == "Command exited with status 7"
        (entry,) = sched.queue()
        assert entry.app_id == "/crash" and entry.count == 1
        assert entry.delay_until is not None
        last = sched.status("/crash").last_task_failure
        assert last is not None and last["state"] == "TASK_FAILED"
        assert sched.tasks("/crash") == []  # nothing relaunched while delayed
        await sched.reset_delay("/crash")
        # Reset: it launches (and fails) again at once.
        await ev.wait_for(
            "status_update_event", taskStatus="TASK_FAILED", where=lambda e: e is not failed
        )
        log = (tmp_path / "logs" / "tasks" / "crash").glob("*.log")
        assert any('"log":"boom\\n"' in p.read_text().replace(" ", "") for p in log)
        ev.close()


async def test_unlaunchable_app_fails_and_backs_off(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        ev = Events(plane.events)
        app = models.parse_app({"id": "/ghost", "args": ["/no/such/binary"], "backoffSeconds": 60})
        await plane.scheduler.create_app(app)
        event = await ev.wait_for("status_update_event", taskStatus="TASK_FAILED")
        assert "/no/such/binary" in event["message"]
        (entry,) = plane.scheduler.queue()
        assert entry.app_id == "/ghost" and entry.delay_until is not None
        assert plane.scheduler.tasks("/ghost") == []
        ev.close()


async def test_memory_limit_is_enforced_and_reported(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        if sched.driver.limiter.kind not in ("cgroup-v1", "cgroup-v2"):  # type: ignore[attr-defined]
            pytest.skip("no writable cgroup memory controller on this host")
        ev = Events(plane.events)
        hog = "x = bytearray(400 * 1024 * 1024); import time; time.sleep(60)"
        app = models.parse_app(
            {"id": "/hog", "args": [sys.executable, "-c", hog], "mem": 64, "backoffSeconds": 60}
        )
        await sched.create_app(app)
        event = await ev.wait_for("status_update_event", taskStatus="TASK_FAILED")
        assert "Memory limit exceeded" in event["message"]
        assert "OOM" in sched.status("/hog").last_task_failure["message"]  # type: ignore[index]
        ev.close()


async def test_rolling_restart_keeps_capacity_healthy(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        app = http_app(
            "/roll",
            instances=2,
            upgradeStrategy={"minimumHealthCapacity": 1.0, "maximumOverCapacity": 0.0},
        )
        dep = await sched.create_app(app)
        await ev.wait_for("deployment_success", id=dep.id)
        before = {t.id for t in sched.tasks("/roll")}
        dep = await sched.restart_app("/roll", force=False)
        assert dep.steps == [[("RestartApplication", "/roll")]]
        with pytest.raises(AppLocked) as locked:
            await sched.restart_app("/roll", force=False)
        assert locked.value.deployment_ids == [dep.id]
        # After every state change of the deployment, both instances' worth stays healthy.
        lowest = 2
        async for event in ev.stream(timeout=60):
            lowest = min(lowest, sum(1 for t in sched.tasks("/roll") if t.healthy))
            if event["eventType"] == "deployment_success" and event["id"] == dep.id:
                break
        assert lowest >= 2
        after = {t.id for t in sched.tasks("/roll")}
        assert len(after) == 2 and not after & before
        assert await passing(plane, "roll") == after
        ev.close()


async def test_label_routes_follow_the_app(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        labels = {"BERTH_VHOST": "a.example, B.example", "HAPROXY_0_VHOST": "c.example"}
        dep = await sched.create_app(http_app("/grp/site", labels=labels))
        routes = await plane.store.kv_list("berth/gateway/routes/")
        assert {e.key.rsplit("/", 1)[1]: e.json() for e in routes[1]} == {
            h: {"cluster": "grp-site"} for h in ("a.example", "b.example", "c.example")
        }
        await ev.wait_for("deployment_success", id=dep.id)
        changed = models.merge_app(sched.app("/grp/site"), {"labels": {"BERTH_VHOST": "a.example"}})
        await sched.update_app(changed, force=False)
        keys = {e.key for e in (await plane.store.kv_list("berth/gateway/routes/"))[1]}
        assert keys == {"berth/gateway/routes/a.example"}
        await sched.delete_app("/grp/site", force=True)
        await ev.wait_for("app_terminated_event", appId="/grp/site")
        assert (await plane.store.kv_list("berth/gateway/routes/"))[1] == []
        ev.close()


async def test_app_without_health_checks_deploys_once_running(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        ev = Events(plane.events)
        app = models.parse_app({"id": "/plain", "cmd": "sleep 300", "instances": 2})
        dep = await plane.scheduler.create_app(app)
        await ev.wait_for("deployment_success", id=dep.id)
        status = plane.scheduler.status("/plain")
        # Marathon counts healthy only for tasks with health results.
        assert (status.running, status.healthy, status.deployments) == (2, 0, [])
        ev.close()


async def test_cancel_deployment_rolls_back_or_just_stops(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        dep = await sched.create_app(http_app("/rb"))
        await ev.wait_for("deployment_success", id=dep.id)
        (good,) = sched.tasks("/rb")
        broken = models.merge_app(sched.app("/rb"), {"env": {"HEALTH_FILE": "/nonexistent"}})
        stuck = await sched.update_app(broken, force=False)
        await ev.wait_for(
            "status_update_event", taskStatus="TASK_RUNNING", where=lambda e: e["taskId"] != good.id
        )
        assert [d.id for d in sched.deployments()] == [stuck.id]
        rollback = await sched.cancel_deployment(stuck.id, force=False)
        assert rollback is not None and rollback.steps == [[("RestartApplication", "/rb")]]
        await ev.wait_for("deployment_failed", id=stuck.id)
        await ev.wait_for("deployment_success", id=rollback.id)
        # The old task never stopped (min health capacity 1) and is all that is left.
        assert [t.id for t in sched.tasks("/rb")] == [good.id]
        assert sched.app("/rb").env == {}  # type: ignore[union-attr]

        stuck = await sched.update_app(
            models.merge_app(sched.app("/rb"), {"env": {"HEALTH_FILE": "/nonexistent"}}),
            force=False,
        )
        assert await sched.cancel_deployment(stuck.id, force=True) is None
        assert sched.deployments() == []
        with pytest.raises(UnknownDeployment):
            await sched.cancel_deployment(stuck.id, force=True)
        ev.close()


async def test_errors(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        docker = models.parse_app(
            {"id": "/d", "container": {"type": "DOCKER", "docker": {"image": "nginx"}}}
        )
        with pytest.raises(UnsupportedApp):
            await sched.create_app(docker)
        assert sched.app("/d") is None
        app = models.parse_app({"id": "/s", "cmd": "sleep 300", "instances": 0})
        await sched.create_app(app)
        with pytest.raises(AppExists):
            await sched.create_app(app)
        with pytest.raises(UnknownApp):
            await sched.delete_app("/nope", force=False)
        with pytest.raises(UnknownApp):
            await sched.restart_app("/nope", force=False)
