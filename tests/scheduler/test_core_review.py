"""Deployment bookkeeping found wrong in review, with real processes and the real store."""

from __future__ import annotations

from pathlib import Path

import pytest

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
