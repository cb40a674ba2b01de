"""Pure decisions: rolling upgrades, scaling, deletion and backoff, without processes."""

from __future__ import annotations

import itertools

import pytest

from berth.scheduler.plan import Target, backoff_delay, backoff_settled, plan_app
from berth.scheduler.state import Deployment, HealthResult, Task, TaskState

_ids = itertools.count()


def task(
    version: str = "v1",
    state: TaskState = TaskState.RUNNING,
    healthy: bool = True,
    checks: int = 1,
    age: float = 0.0,
) -> Task:
    n = next(_ids)
    # Tests model routable tasks unless a test says otherwise.
    health = [
        HealthResult(
            alive=healthy,
            first_success="t" if healthy else None,
            last_failure=None if healthy else "t",
        )
        for _ in range(checks)
    ]
    return Task(
        id=f"app.{n}",
        app_id="/app",
        host="127.0.0.1",
        ports=[10000 + n],
        state=state,
        staged_at="",
        started_at=None,
        version=version,
        health_results=health,
        config_version=version,
        staged_mono=1000.0 - age,
        in_catalog=True,
    )


def target(n: int, version: str = "v1", mhc: float = 1.0, moc: float = 1.0) -> Target:
    return Target(n, version, mhc, moc)


def test_fresh_app_starts_all_instances() -> None:
    plan = plan_app(target(3), [], launch_allowed=True)
    assert plan.start == 3 and plan.kill == () and not plan.converged


def test_backoff_holds_launches_and_reports_them_delayed() -> None:
    plan = plan_app(target(2), [task()], launch_allowed=False)
    assert plan.start == 0 and plan.delayed == 1


def test_converged_only_when_all_healthy() -> None:
    assert plan_app(target(2), [task(), task()], launch_allowed=True).converged
    unhealthy = [task(), task(healthy=False)]
    assert not plan_app(target(2), unhealthy, launch_allowed=True).converged


def test_new_tasks_count_only_once_in_the_catalog() -> None:
    old = [task("v1"), task("v1")]
    fresh = task("v2")
    fresh.in_catalog = False
    plan = plan_app(target(2, "v2", 1.0, 0.0), [*old, fresh], launch_allowed=True)
    assert plan.kill == ()  # healthy but not yet routable: the old ones stay
    portless = task("v2")
    portless.in_catalog, portless.ports = False, []
    assert plan_app(target(1, "v2"), [portless], launch_allowed=True).converged


def test_app_without_checks_is_healthy_once_running() -> None:
    tasks = [task(checks=0), task(checks=0, state=TaskState.STAGING)]
    plan = plan_app(target(2), tasks, launch_allowed=True)
    assert not plan.converged
    assert plan_app(target(2), [task(checks=0)] * 2, launch_allowed=True).converged


def test_scale_down_kills_unhealthy_then_staging_then_youngest() -> None:
    old = task(age=100)
    young = task(age=1)
    staging = task(state=TaskState.STAGING, healthy=False)
    sick = task(healthy=False, age=50)
    plan = plan_app(target(1), [old, young, staging, sick], launch_allowed=True)
    assert plan.kill == (sick.id, staging.id, young.id)
    assert plan.start == 0


def test_killing_tasks_are_not_counted_or_killed_again() -> None:
    dying = task(state=TaskState.KILLING)
    plan = plan_app(target(1), [dying], launch_allowed=True)
    assert plan.start == 1 and plan.kill == ()


def test_rolling_upgrade_keeps_full_capacity_with_defaults() -> None:
    # minimumHealthCapacity=1: no old task goes before a new one is healthy.
    old = [task("v1"), task("v1")]
    plan = plan_app(target(2, "v2", 1.0, 0.0), old, launch_allowed=True)
    assert plan.kill == () and plan.start == 1  # one over capacity even with moc=0
    new_starting = task("v2", state=TaskState.STAGING, healthy=False)
    plan = plan_app(target(2, "v2", 1.0, 0.0), [*old, new_starting], launch_allowed=True)
    assert plan.kill == () and plan.start == 0
    new_ok = task("v2")
    plan = plan_app(target(2, "v2", 1.0, 0.0), [*old, new_ok], launch_allowed=True)
    assert len(plan.kill) == 1 and plan.start == 1


def test_rolling_upgrade_with_over_capacity_starts_all_new_at_once() -> None:
    old = [task("v1") for _ in range(4)]
    plan = plan_app(target(4, "v2", 1.0, 1.0), old, launch_allowed=True)
    assert plan.start == 4 and plan.kill == ()


def test_min_health_half_kills_half_immediately() -> None:
    old = [task("v1") for _ in range(4)]
    plan = plan_app(target(4, "v2", 0.5, 0.0), old, launch_allowed=True)
    assert len(plan.kill) == 2 and plan.start == 2


def test_min_health_zero_replaces_everything_at_once() -> None:
    old = [task("v1") for _ in range(3)]
    plan = plan_app(target(3, "v2", 0.0, 0.0), old, launch_allowed=True)
    assert len(plan.kill) == 3 and plan.start == 3


def test_upgrade_finishes_by_killing_remaining_old_tasks() -> None:
    old = [task("v1")]
    new = [task("v2"), task("v2")]
    plan = plan_app(target(2, "v2"), [*old, *new], launch_allowed=True)
    assert plan.kill == (old[0].id,) and plan.start == 0 and not plan.converged


def test_delete_kills_everything_and_converges_when_gone() -> None:
    tasks = [task(), task(state=TaskState.STAGING)]
    plan = plan_app(None, tasks, launch_allowed=True)
    assert set(plan.kill) == {t.id for t in tasks} and not plan.converged
    assert plan_app(None, [], launch_allowed=True).converged
    assert not plan_app(None, [task(state=TaskState.KILLING)], launch_allowed=True).converged


def test_scale_to_zero() -> None:
    plan = plan_app(target(0), [task(), task()], launch_allowed=True)
    assert len(plan.kill) == 2
    assert plan_app(target(0), [], launch_allowed=True).converged


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(0, 0.0), (1, 1.0), (2, 1.15), (3, 1.15**2), (10, 1.15**9)],
)
def test_backoff_grows_by_factor(failures: int, expected: float) -> None:
    assert backoff_delay(failures, 1.0, 1.15, 3600) == pytest.approx(expected)


def test_backoff_is_capped_even_for_huge_failure_counts() -> None:
    assert backoff_delay(50, 1.0, 2.0, 60) == 60
    assert backoff_delay(100_000, 1.0, 2.0, 60) == 60
    assert backoff_delay(3, 0.0, 2.0, 60) == 0.0


def test_backoff_resets_only_after_a_current_task_stays_up() -> None:
    up = task("v2")
    up.running_mono = 100.0
    assert backoff_settled([up], "v2", now=111.0, settle_seconds=10)
    assert not backoff_settled([up], "v2", now=105.0, settle_seconds=10)
    assert not backoff_settled([up], "v3", now=111.0, settle_seconds=10)
    sick = task("v2", healthy=False)
    sick.running_mono = 0.0
    assert not backoff_settled([sick], "v2", now=111.0, settle_seconds=10)


def test_task_state_predicates_and_reprs() -> None:
    assert TaskState.STAGING.is_active and TaskState.STAGING.is_staged
    assert TaskState.RUNNING.is_active and not TaskState.RUNNING.is_terminal
    assert not TaskState.KILLING.is_active and not TaskState.KILLING.is_terminal
    assert all(s.is_terminal for s in (TaskState.FINISHED, TaskState.FAILED, TaskState.KILLED))
    t = task(healthy=False)
    t.health_results[0].last_failure = None
    assert repr(t) == f"<Task {t.id} RUNNING pid=None ports={t.ports} healthy=False>"
    assert not t.unhealthy and not t.healthy  # never reported: neither
    t.health_results[0].last_failure = "t"
    assert t.unhealthy and t.health == t.health_results
    dep = Deployment("d1", "v", ["/app"], [[("RestartApplication", "/app")]], 1, 1)
    assert repr(dep) == "<Deployment d1 apps=['/app'] ['RestartApplication'] step=1/1>"
    assert dep.current_actions == [("RestartApplication", "/app")]
    assert Deployment.from_json(dep.to_json()).to_json() == dep.to_json()
    assert Task.from_json(t.to_json()).to_json() == t.to_json()
