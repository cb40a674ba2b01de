"""What each task may use (the limits the kernel holds) and what it uses now.

Served on berth's own ``/api/scheduler/usage``: Marathon's app and task JSON
have no field for it, and the marathon client rejects keys it does not know.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

import psutil

from berth.scheduler.state import Task


class LimitReader(Protocol):
    kind: str

    def in_force(self, task_id: str) -> dict[str, int | None]: ...


def tree_usage(pid: int) -> tuple[int, float] | None:
    """RSS bytes and CPU seconds (user + system) of a process and all its
    descendants (a task's sh and what it runs); None when it is gone."""
    try:
        leader = psutil.Process(pid)
        procs = [leader, *leader.children(recursive=True)]
    except psutil.Error:
        return None
    rss, cpu = 0, 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            rss += proc.memory_info().rss
            times = proc.cpu_times()
            cpu += times.user + times.system
    return rss, cpu


def task_usage(tasks: Sequence[Task], limiter: LimitReader | None) -> dict[str, Any]:
    """Blocking (reads /proc and cgroup files): call it off the event loop."""
    rows: list[dict[str, Any]] = []
    for task in tasks:
        row: dict[str, Any] = {
            "id": task.id,
            "appId": task.app_id,
            "pid": task.pid,
            "limits": task.limits_in_force,
            "memoryLimitBytes": None,
            "cpuQuotaMicros": None,
            "rssBytes": None,
            "cpuSeconds": None,
        }
        if limiter is not None:
            with contextlib.suppress(OSError, ValueError):
                held = limiter.in_force(task.id)
                row["memoryLimitBytes"] = held.get("memory")
                row["cpuQuotaMicros"] = held.get("cpu_quota")
        if task.pid is not None and (measured := tree_usage(task.pid)) is not None:
            row["rssBytes"], row["cpuSeconds"] = measured[0], round(measured[1], 3)
        rows.append(row)
    return {"limits": limiter.kind if limiter is not None else "none", "tasks": rows}
