"""Pure scheduling decisions: what to start and what to kill for one app, now.

The reconcile loop in ``core.py`` observes tasks, calls :func:`plan_app` and
performs the result. Nothing here does I/O or reads a clock, so every rule of
Marathon's deployments (upgradeStrategy, scaling, backoff) is unit-tested
without processes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from berth.scheduler.state import Task


@dataclass(frozen=True)
class Target:
    """What the app wants; ``None`` instead of a Target means the app is being deleted."""

    instances: int
    config_version: str
    minimum_health_capacity: float = 1.0
    maximum_over_capacity: float = 1.0


@dataclass(frozen=True)
class Plan:
    start: int = 0
    kill: tuple[str, ...] = ()
    # True when the app matches its target: every deployment step of it is done.
    converged: bool = False
    # Tasks that could start now but wait for the launch backoff.
    delayed: int = 0
    reasons: dict[str, str] = field(default_factory=dict)


def backoff_delay(failures: int, seconds: float, factor: float, cap: float) -> float:
    """Marathon's launch delay after ``failures`` consecutive failed tasks:
    ``backoffSeconds * backoffFactor ** (failures - 1)``, capped at maxLaunchDelaySeconds."""
    if failures <= 0 or seconds <= 0:
        return 0.0
    try:
        delay = seconds * factor ** (failures - 1)
    except OverflowError:
        return cap
    return min(delay, cap)


def backoff_settled(
    tasks: Sequence[Task], config_version: str, now: float, settle_seconds: float
) -> bool:
    """Whether a current task has stayed up (healthy) long enough to forgive past failures."""
    return any(
        t.config_version == config_version
        and t.healthy
        and t.running_mono is not None
        and now - t.running_mono >= settle_seconds
        for t in tasks
    )


def _kill_order(task: Task) -> tuple[int, float]:
    # Unhealthy and still-starting tasks go first (they serve nothing), then the youngest,
    # which is Marathon's default killSelection (YoungestFirst).
    rank = 0 if task.unhealthy else 1 if task.state.is_staged else 2
    return rank, -task.staged_mono


def plan_app(target: Target | None, tasks: Sequence[Task], *, launch_allowed: bool) -> Plan:
    """Decide one step for one app.

    ``tasks`` are the app's non-terminal tasks. Tasks already KILLING are
    neither counted nor killed again. ``launch_allowed`` is False while the
    app's launch backoff runs.
    """
    live = [t for t in tasks if t.state.is_active]
    if target is None:
        return Plan(
            kill=tuple(t.id for t in live),
            converged=not any(not t.state.is_terminal for t in tasks),
            reasons={t.id: "app deleted" for t in live},
        )
    n = target.instances
    new = [t for t in live if t.config_version == target.config_version]
    old = [t for t in live if t.config_version != target.config_version]
    kill: list[Task] = []
    reasons: dict[str, str] = {}

    if len(new) > n:
        extra = sorted(new, key=_kill_order)[: len(new) - n]
        kill.extend(extra)
        reasons.update({t.id: "scaling down" for t in extra})
        new = [t for t in new if t not in extra]

    healthy_new = sum(1 for t in new if t.ready)
    if old:
        # Old tasks count as capacity whatever their health; new ones only once healthy
        # and in the catalog (ready).
        # An old task may go only while minimumHealthCapacity stays covered.
        min_healthy = math.ceil(n * target.minimum_health_capacity)
        can_kill = max(0, len(old) + healthy_new - min_healthy)
        doomed = sorted(old, key=_kill_order)[:can_kill]
        kill.extend(doomed)
        reasons.update({t.id: "replaced by new version" for t in doomed})
        old = [t for t in old if t not in doomed]

    want = max(0, n - len(new))
    if old:
        # Over capacity allowed while replacing; one extra when minimumHealthCapacity=1
        # and maximumOverCapacity=0, which could otherwise never make progress.
        max_total = n + math.floor(n * target.maximum_over_capacity)
        if max_total == n and math.ceil(n * target.minimum_health_capacity) >= n:
            max_total += 1
        want = min(want, max(0, max_total - len(old) - len(new)))
    start = want if launch_allowed else 0
    converged = not old and len(new) == n and healthy_new == n and not kill
    return Plan(
        start=start,
        kill=tuple(t.id for t in kill),
        converged=converged,
        delayed=0 if launch_allowed else want,
        reasons=reasons,
    )
