"""The scheduler's state model and its persistence in the store.

Keys (all JSON, written through the StoreClient so an external Consul works too):
``berth/scheduler/apps/<id>``, ``berth/scheduler/tasks/<task-id>``,
``berth/scheduler/deployments/<id>``. App keys use the app id without its
leading slash; the stored document is the app's Marathon JSON.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from berth.store.client import StoreClient

log = logging.getLogger("berth.scheduler.state")

PREFIX = "berth/scheduler/"
APPS = PREFIX + "apps/"
TASKS = PREFIX + "tasks/"
DEPLOYMENTS = PREFIX + "deployments/"


def now_iso() -> str:
    """Marathon's timestamp format: millisecond precision, Z suffix."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class TaskState(enum.Enum):
    STAGING = "TASK_STAGING"
    STARTING = "TASK_STARTING"
    RUNNING = "TASK_RUNNING"
    KILLING = "TASK_KILLING"
    FINISHED = "TASK_FINISHED"
    FAILED = "TASK_FAILED"
    KILLED = "TASK_KILLED"
    LOST = "TASK_LOST"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def is_active(self) -> bool:
        """Counts towards the app's instances: launched and not being stopped."""
        return self in (TaskState.STAGING, TaskState.STARTING, TaskState.RUNNING)

    @property
    def is_staged(self) -> bool:
        return self in (TaskState.STAGING, TaskState.STARTING)


_TERMINAL = frozenset({TaskState.FINISHED, TaskState.FAILED, TaskState.KILLED, TaskState.LOST})


@dataclass
class HealthResult:
    alive: bool = False
    consecutive_failures: int = 0
    first_success: str | None = None
    last_success: str | None = None
    last_failure: str | None = None
    last_failure_cause: str | None = None

    @property
    def healthy(self) -> bool:
        # Marathon's UI: healthy only once a check has ever passed and it is alive now.
        return self.alive and self.first_success is not None

    @property
    def reported(self) -> bool:
        """Has a result: a success, or a failure that counted (not inside the grace period)."""
        return self.first_success is not None or self.last_failure is not None


@dataclass
class Task:
    id: str
    app_id: str
    host: str
    ports: list[int]
    state: TaskState
    staged_at: str
    started_at: str | None
    version: str
    # One per health check of the app, from launch; ``health`` shows the reported ones.
    health_results: list[HealthResult] = field(default_factory=list)
    pid: int | None = None
    limits_in_force: str = "none"
    # The app's lastConfigChangeAt at launch: scaling keeps tasks, a config change replaces them.
    config_version: str = ""
    # psutil create_time of pid, so a recycled pid is never mistaken for the task.
    create_time: float | None = None
    message: str = ""
    # monotonic times, not persisted
    staged_mono: float = field(default_factory=time.monotonic)
    running_mono: float | None = None
    # The store acknowledged its catalog entry (gateways can route to it).
    in_catalog: bool = False

    def __repr__(self) -> str:
        return (
            f"<Task {self.id} {self.state.name} pid={self.pid} ports={self.ports} "
            f"healthy={self.healthy}>"
        )

    @property
    def healthy(self) -> bool:
        """RUNNING and, when the app has health checks, all of them passing."""
        if self.state is not TaskState.RUNNING:
            return False
        return all(h.healthy for h in self.health_results)

    @property
    def ready(self) -> bool:
        """Healthy and routable: in the catalog, or nothing to route (no ports).
        Deployments wait for this, so old tasks never go before new ones are routable."""
        return self.healthy and (self.in_catalog or not self.ports)

    @property
    def unhealthy(self) -> bool:
        # A check still in its grace period without any result is neither healthy nor
        # unhealthy (Marathon's tasksUnhealthy counts only reported failures).
        return self.state is TaskState.RUNNING and any(
            h.reported and not h.alive for h in self.health_results
        )

    @property
    def health(self) -> list[HealthResult]:
        """The results Marathon would show (healthCheckResults): only reported ones."""
        return [h for h in self.health_results if h.reported]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "appId": self.app_id,
            "host": self.host,
            "ports": self.ports,
            "state": self.state.value,
            "stagedAt": self.staged_at,
            "startedAt": self.started_at,
            "version": self.version,
            "configVersion": self.config_version,
            "pid": self.pid,
            "createTime": self.create_time,
            "limitsInForce": self.limits_in_force,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Task:
        return cls(
            id=str(doc["id"]),
            app_id=str(doc["appId"]),
            host=str(doc.get("host", "127.0.0.1")),
            ports=[int(p) for p in doc.get("ports", [])],
            state=TaskState(doc.get("state", TaskState.LOST.value)),
            staged_at=str(doc.get("stagedAt", "")),
            started_at=doc.get("startedAt"),
            version=str(doc.get("version", "")),
            config_version=str(doc.get("configVersion", "")),
            pid=doc.get("pid"),
            create_time=doc.get("createTime"),
            limits_in_force=str(doc.get("limitsInForce", "none")),
        )


@dataclass
class Deployment:
    id: str
    version: str
    affected_apps: list[str]
    steps: list[list[tuple[str, str]]]
    current_step: int
    total_steps: int
    # The app definition before the deployment (Marathon JSON), for rollback; None = new app.
    original: dict[str, Any] | None = None

    def __repr__(self) -> str:
        actions = [a for step in self.steps for a, _ in step]
        return (
            f"<Deployment {self.id} apps={self.affected_apps} {actions} "
            f"step={self.current_step}/{self.total_steps}>"
        )

    @property
    def current_actions(self) -> list[tuple[str, str]]:
        if 1 <= self.current_step <= len(self.steps):
            return self.steps[self.current_step - 1]
        return []

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "affectedApps": self.affected_apps,
            "steps": [[list(a) for a in step] for step in self.steps],
            "currentStep": self.current_step,
            "totalSteps": self.total_steps,
            "original": self.original,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Deployment:
        return cls(
            id=str(doc["id"]),
            version=str(doc["version"]),
            affected_apps=[str(a) for a in doc["affectedApps"]],
            steps=[[(str(a[0]), str(a[1])) for a in step] for step in doc["steps"]],
            current_step=int(doc["currentStep"]),
            total_steps=int(doc["totalSteps"]),
            original=doc.get("original"),
        )


@dataclass
class QueueEntry:
    app_id: str
    count: int
    delay_until: float | None
    since: str


@dataclass
class AppStatus:
    tasks: list[Task]
    staged: int
    running: int
    healthy: int
    unhealthy: int
    deployments: list[Deployment]
    last_task_failure: dict[str, Any] | None


def app_key(app_id: str) -> str:
    return APPS + app_id.lstrip("/")


class StateStore:
    """Reads and writes the scheduler's keys; every method is one store round trip."""

    def __init__(self, store: StoreClient) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"<StateStore {self.store.url} prefix={PREFIX}>"

    async def load(self) -> tuple[list[dict[str, Any]], list[Task], list[Deployment]]:
        _, entries = await self.store.kv_list(PREFIX)
        apps: list[dict[str, Any]] = []
        tasks: list[Task] = []
        deployments: list[Deployment] = []
        for entry in entries:
            # One unreadable key (hand-edited, or written by something else) is skipped:
            # failing here would leave every app unsupervised and the API at 503 for good.
            try:
                doc = entry.json()
                if doc is None:
                    continue
                if not isinstance(doc, dict):
                    raise TypeError(f"expected a JSON object, got {type(doc).__name__}")
                if entry.key.startswith(APPS):
                    apps.append(doc)
                elif entry.key.startswith(TASKS):
                    tasks.append(Task.from_json(doc))
                elif entry.key.startswith(DEPLOYMENTS):
                    deployments.append(Deployment.from_json(doc))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                log.error("scheduler state: skipping unreadable key %s: %s", entry.key, exc)
        return apps, tasks, deployments

    async def put_app(self, app_id: str, doc: Mapping[str, Any]) -> None:
        await self.store.kv_put_json(app_key(app_id), doc)

    async def delete_app(self, app_id: str) -> None:
        await self.store.kv_delete(app_key(app_id))

    async def put_task(self, task: Task) -> None:
        await self.store.kv_put_json(TASKS + task.id, task.to_json())

    async def delete_task(self, task_id: str) -> None:
        await self.store.kv_delete(TASKS + task_id)

    async def put_deployment(self, deployment: Deployment) -> None:
        await self.store.kv_put_json(DEPLOYMENTS + deployment.id, deployment.to_json())

    async def delete_deployment(self, deployment_id: str) -> None:
        await self.store.kv_delete(DEPLOYMENTS + deployment_id)
