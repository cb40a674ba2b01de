"""Scheduler state as Marathon JSON: apps with embeds, tasks, deployments, queue, info.

The scheduler core's Task/AppStatus/Deployment/QueueEntry are read through small
read-only protocols, so rendering does not depend on how the core stores them.
Rendered documents carry only keys the third-party ``marathon`` client's strict
models accept: an unknown key there is a ``TypeError`` in the client.
"""

from __future__ import annotations

import copy
import enum
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from berth.scheduler.models import LOCAL_AGENT_ID, AppDefinition

EMBEDS = frozenset({"tasks", "counts", "deployments", "lastTaskFailure", "readiness", "taskStats"})


def parse_embed(values: Iterable[str]) -> set[str]:
    """Marathon's embed names with or without "apps."/"app."/"group.apps." prefixes."""
    found: set[str] = set()
    for value in values:
        name = value
        for prefix in ("group.apps.", "apps.", "app."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        if name == "failures":
            name = "lastTaskFailure"
        if name in EMBEDS:
            found.add(name)
    return found


class HealthView(Protocol):
    @property
    def alive(self) -> bool: ...
    @property
    def consecutive_failures(self) -> int: ...
    @property
    def first_success(self) -> str | None: ...
    @property
    def last_success(self) -> str | None: ...
    @property
    def last_failure(self) -> str | None: ...
    @property
    def last_failure_cause(self) -> str | None: ...


class TaskView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def app_id(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def ports(self) -> Sequence[int]: ...
    @property
    def state(self) -> enum.Enum: ...
    @property
    def staged_at(self) -> str: ...
    @property
    def started_at(self) -> str | None: ...
    @property
    def version(self) -> str: ...
    @property
    def health(self) -> Sequence[HealthView]: ...


class DeploymentView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def affected_apps(self) -> Sequence[str]: ...
    @property
    def steps(self) -> Sequence[Sequence[tuple[str, str]]]: ...
    @property
    def current_step(self) -> int: ...
    @property
    def total_steps(self) -> int: ...


class StatusView(Protocol):
    @property
    def tasks(self) -> Sequence[TaskView]: ...
    @property
    def staged(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def healthy(self) -> int: ...
    @property
    def unhealthy(self) -> int: ...
    @property
    def deployments(self) -> Sequence[DeploymentView]: ...
    @property
    def last_task_failure(self) -> Mapping[str, Any] | None: ...


class QueueView(Protocol):
    @property
    def app_id(self) -> str: ...
    @property
    def count(self) -> int: ...
    @property
    def delay_until(self) -> float | None: ...
    @property
    def since(self) -> str: ...


TASK_FAILURE_KEYS = (
    "appId",
    "host",
    "message",
    "taskId",
    "instanceId",
    "slaveId",
    "state",
    "timestamp",
    "version",
)


def render_app(
    app: AppDefinition, status: StatusView | None = None, embed: Iterable[str] = ()
) -> dict[str, Any]:
    """GET /v2/apps(/{id}) JSON; ``embed`` holds names from :func:`parse_embed`."""
    doc = copy.deepcopy(dict(app.raw))
    wanted = set(embed)
    if status is None:
        return doc
    if "counts" in wanted:
        doc.update(
            tasksStaged=status.staged,
            tasksRunning=status.running,
            tasksHealthy=status.healthy,
            tasksUnhealthy=status.unhealthy,
        )
    if "deployments" in wanted:
        doc["deployments"] = [{"id": d.id} for d in status.deployments]
    if "readiness" in wanted:
        doc["readinessCheckResults"] = []
    if "tasks" in wanted:
        doc["tasks"] = [render_task(t, app) for t in status.tasks]
    if "lastTaskFailure" in wanted and status.last_task_failure:
        doc["lastTaskFailure"] = {
            k: v for k, v in status.last_task_failure.items() if k in TASK_FAILURE_KEYS
        }
    return doc


def render_task(task: TaskView, app: AppDefinition | None = None) -> dict[str, Any]:
    """Only MarathonTask's constructor keys: Marathon's own examples add cpus/mem,
    which the marathon client rejects."""
    doc: dict[str, Any] = {
        "id": task.id,
        "appId": task.app_id,
        "host": task.host,
        "ports": list(task.ports),
        "servicePorts": [p.port for p in app.port_definitions] if app else [],
        "slaveId": LOCAL_AGENT_ID,
        "stagedAt": task.staged_at,
        "version": task.version,
        "state": str(task.state.value),
        "ipAddresses": [
            {"ipAddress": task.host, "protocol": "IPv6" if ":" in task.host else "IPv4"}
        ],
    }
    if task.started_at is not None:
        doc["startedAt"] = task.started_at
    # A check that has produced no result yet has no entry in Marathon (the UI
    # shows the task as Unknown), rather than a not-alive one (Unhealthy).
    checked = [h for h in task.health if h.first_success or h.last_success or h.last_failure]
    if checked:
        doc["healthCheckResults"] = [
            {
                "alive": h.alive,
                "consecutiveFailures": h.consecutive_failures,
                "firstSuccess": h.first_success,
                "lastSuccess": h.last_success,
                "lastFailure": h.last_failure,
                "lastFailureCause": h.last_failure_cause,
                "taskId": task.id,
            }
            for h in checked
        ]
    return doc


def render_tasks_text(apps: Iterable[tuple[AppDefinition, Sequence[TaskView]]]) -> str:
    """Marathon's text/plain task list: ``app<TAB>servicePort<TAB>host:port<TAB>...``."""
    lines: list[str] = []
    for app, tasks in apps:
        clean = app.id.lstrip("/").replace("/", "_")
        if not app.port_definitions:
            lines.append(clean + "\t \t" + "".join(f"{t.host}\t" for t in tasks))
            continue
        for i, port in enumerate(app.port_definitions):
            endpoints = "".join(f"{t.host}:{t.ports[i]}\t" for t in tasks if i < len(t.ports))
            lines.append(f"{clean}\t{port.port}\t{endpoints}")
    return "".join(line + "\n" for line in lines)


def render_deployment(deployment: DeploymentView) -> dict[str, Any]:
    """``current_step`` is Marathon's 1-based index of the running step (0 = not started)."""
    steps = [
        {"actions": [{"action": action, "app": app_id} for action, app_id in step]}
        for step in deployment.steps
    ]
    index = deployment.current_step - 1
    current = deployment.steps[index] if 0 <= index < len(deployment.steps) else []
    return {
        "id": deployment.id,
        "version": deployment.version,
        "affectedApps": list(deployment.affected_apps),
        "affectedPods": [],
        "steps": steps,
        "currentActions": [
            {"action": action, "app": app_id, "readinessCheckResults": []}
            for action, app_id in current
        ],
        "currentStep": deployment.current_step,
        "totalSteps": deployment.total_steps,
    }


def render_queue(
    entries: Iterable[QueueView],
    app_lookup: Callable[[str], AppDefinition | None],
    now: float | None = None,
) -> dict[str, Any]:
    """GET /v2/queue; ``delay_until`` is on the monotonic clock."""
    clock = time.monotonic() if now is None else now
    items: list[dict[str, Any]] = []
    for entry in entries:
        app = app_lookup(entry.app_id)
        if app is None:
            continue
        left = 0.0 if entry.delay_until is None else max(0.0, entry.delay_until - clock)
        items.append(
            {
                "count": entry.count,
                "delay": {"timeLeftSeconds": math.ceil(left), "overdue": left <= 0},
                "since": entry.since,
                "app": render_app(app),
            }
        )
    return {"queue": items}


def render_info(*, version: str, leader: str, http_port: int) -> dict[str, Any]:
    """GET /v2/info with the sub-objects the marathon client's MarathonInfo needs."""
    return {
        "name": "berth",
        "version": version,
        "buildref": "berth",
        "elected": True,
        "leader": leader,
        "frameworkId": LOCAL_AGENT_ID,
        "marathon_config": {
            "checkpoint": False,
            "executor": "//cmd",
            "failover_timeout": 604800,
            "framework_name": "berth",
            "ha": False,
            "hostname": leader.rsplit(":", 1)[0],
            "local_port_min": 10000,
            "local_port_max": 20000,
            "master": "local",
            "mesos_role": None,
            "mesos_user": None,
            "reconciliation_initial_delay": 0,
            "reconciliation_interval": 5000,
            "task_launch_timeout": 300000,
            "features": [],
        },
        "zookeeper_config": {},
        "http_config": {"http_port": http_port},
        "event_subscriber": None,
    }


def render_group(
    group_id: str, apps: Sequence[dict[str, Any]], *, version: str
) -> dict[str, Any] | None:
    """GET /v2/groups(/{id}): rendered ``apps`` arranged in Marathon's group tree.

    Groups are implied by app ids ("/a/b/web" lives in "/a/b"); None when no
    app lives at or under ``group_id`` (except the root, which always exists).
    """
    prefix = "/" if group_id == "/" else group_id + "/"
    members = [a for a in apps if str(a["id"]).startswith(prefix)]
    if not members and group_id != "/":
        return None
    direct = [a for a in members if str(a["id"]).rsplit("/", 1)[0] in ("", group_id)]
    children = sorted(
        {prefix + str(a["id"])[len(prefix) :].split("/", 1)[0] for a in members if a not in direct}
    )
    groups = [render_group(child, members, version=version) for child in children]
    return {
        "id": group_id,
        "apps": direct,
        "groups": [g for g in groups if g is not None],
        "pods": [],
        "dependencies": [],
        "version": version,
    }
