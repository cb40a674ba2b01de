"""What the scheduler needs from a driver, and the Marathon task environment."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from berth.scheduler.models import AppDefinition


@dataclass(frozen=True)
class LaunchSpec:
    task_id: str
    app_id: str
    cmd: str | None
    args: tuple[str, ...] | None
    env: Mapping[str, str]
    cpus: float
    mem: float
    log_path: Path
    container_image: str | None = None


@dataclass(frozen=True)
class Exit:
    """How a task ended. ``returncode`` < 0 is the signal number, as in subprocess."""

    returncode: int
    oom: bool = False
    killed_by_us: bool = False
    # Which mechanism caught the memory overrun: the cgroup OOM killer or RLIMIT_AS.
    limit: str = "cgroup"

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.oom

    @property
    def message(self) -> str:
        if self.oom and self.limit == "rlimit":
            return "Memory limit exceeded: an allocation failed under RLIMIT_AS (mem)"
        if self.oom:
            return "Memory limit exceeded: the task was OOM-killed (its memory cgroup hit mem)"
        if self.killed_by_us:
            return "Task killed"
        if self.returncode < 0:
            return f"Command terminated by signal {-self.returncode}"
        return f"Command exited with status {self.returncode}"


class TaskHandle(Protocol):
    pid: int
    create_time: float
    limits_in_force: str

    async def wait(self) -> Exit: ...

    async def stop(self, grace_seconds: float) -> Exit: ...


class Driver(Protocol):
    def check(self, app: AppDefinition) -> None:
        """Raise UnsupportedApp if this driver cannot run ``app``."""

    async def launch(self, spec: LaunchSpec) -> TaskHandle: ...

    def reap_orphans(self, task_ids: Mapping[str, tuple[int | None, float | None]]) -> int:
        """Kill leftovers of tasks a previous control plane ran; returns how many."""
        ...

    def close(self) -> None: ...


_LABEL_NAME = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class TaskEnv:
    host: str
    ports: list[int]
    task_id: str
    extra: Mapping[str, str] = field(default_factory=dict)


def marathon_env(app: AppDefinition, env: TaskEnv) -> dict[str, str]:
    """The environment Marathon gives a task (docs/task-environment-vars.md).

    The app's own ``env`` comes first so Marathon's variables win on a clash,
    except ``PORT``-style names Marathon leaves to the app when it sets them.
    """
    out: dict[str, str] = dict(app.env)
    ports = env.ports
    for i, port in enumerate(ports):
        out[f"PORT{i}"] = str(port)
        name = app.port_definitions[i].name if i < len(app.port_definitions) else None
        if name:
            out[f"PORT_{name.upper()}"] = str(port)
    if ports:
        out.setdefault("PORT", str(ports[0]))
        out["PORTS"] = ",".join(str(p) for p in ports)
    out["HOST"] = env.host
    out["MARATHON_APP_ID"] = app.id
    out["MARATHON_APP_VERSION"] = app.version
    out["MESOS_TASK_ID"] = env.task_id
    out["MARATHON_APP_RESOURCE_CPUS"] = str(app.cpus)
    out["MARATHON_APP_RESOURCE_MEM"] = str(app.mem)
    out["MARATHON_APP_RESOURCE_DISK"] = str(app.disk)
    if app.container_image:
        out["MARATHON_APP_DOCKER_IMAGE"] = app.container_image
    out["MARATHON_APP_LABELS"] = " ".join(
        _LABEL_NAME.sub("_", k).upper() for k in sorted(app.labels)
    )
    for key, value in app.labels.items():
        out[f"MARATHON_APP_LABEL_{_LABEL_NAME.sub('_', key).upper()}"] = value
    out.update(env.extra)
    return out
