"""Deployment bookkeeping found wrong in review, with real processes and the real store."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from berth.scheduler.state import DEPLOYMENTS, TASKS, app_key
from tests.scheduler.core_support import Events, await_until, control_plane, http_app

pytestmark = pytest.mark.slow


async def test_scale_kill_during_a_deployment_supersedes_it(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        ev = Events(plane.events)
        # Never healthy (and inside the grace period): its deployment stays in progress.
        stuck = await sched.create_app(
            http_app("/ks", instances=2, env={"HEALTH_FILE": "/nonexistent"})
        )
        await await_until(
            lambda: sum(t.state.name == "RUNNING" for t in sched.tasks("/ks")) == 2,
            what="2 tasks running",
        )
        victim = sched.tasks("/ks")[0]
        dep = await sched.kill_tasks([victim.id], scale=True)
        assert not isinstance(dep, list)
        # The scale deployment replaces the one in progress; that one must not linger
        # in /v2/deployments (and the store) forever.
        await ev.wait_for("deployment_failed", id=stuck.id, timeout=10)
        assert [d.id for d in sched.deployments()] == [dep.id]
        ev.close()


async def test_unreadable_state_keys_do_not_stop_recovery(tmp_path: Path) -> None:
    async with control_plane(tmp_path) as plane:
        ev = Events(plane.events)
        dep = await plane.scheduler.create_app(http_app("/keep"))
        await ev.wait_for("deployment_success", id=dep.id)
        ev.close()
        # What an operator (or a half-written external Consul) may leave under our prefix.
        await plane.store.kv_put(TASKS + "garbage", "not json")
        await plane.store.kv_put_json(TASKS + "no-id", {"appId": "/keep"})
        await plane.store.kv_put_json(app_key("/list"), [1, 2])
        await plane.store.kv_put_json(app_key("/vi"), {"id": "/vi", "cmd": "x", "versionInfo": 1})
        await plane.store.kv_put_json(DEPLOYMENTS + "bad", {"id": "bad"})
    async with control_plane(tmp_path) as plane:
        sched = plane.scheduler
        assert [a.id for a in sched.apps()] == ["/keep"]
        await await_until(lambda: sched.status("/keep").healthy == 1, what="the app back")


async def test_an_app_too_large_for_the_store_is_a_422_and_changes_nothing(
    tmp_path: Path,
) -> None:
    big = {"A": "x" * 700_000}  # over the store's 512 KiB value limit, under the API's 1 MiB
    env = {"HEALTH_FILE": "/nonexistent"}  # never healthy: its deployment stays in progress
    async with control_plane(tmp_path) as plane, httpx.AsyncClient(base_url=plane.url) as client:
        r = await client.post("/v2/apps", json={"id": "/big", "cmd": "x", "env": big})
        assert r.status_code == 422, r.text
        assert r.json()["details"][0]["path"] == "/"
        assert (await client.get("/v2/apps/big")).status_code == 404
        stuck = await plane.scheduler.create_app(http_app("/ok", env=env))
        r = await client.put("/v2/apps/ok", params={"force": "true"}, json={"env": big})
        assert r.status_code == 422, r.text
        assert plane.scheduler.app("/ok").env == env  # type: ignore[union-attr]
        # A refused forced update must not have cancelled the deployment in progress.
        assert [d.id for d in plane.scheduler.deployments()] == [stuck.id]
