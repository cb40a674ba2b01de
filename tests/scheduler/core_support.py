"""Helpers for the scheduler core tests: an in-process control plane (store + scheduler
on a real socket), event waiters, tiny task programs and process-table checks."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from berth.controlplane.config import ControlPlaneConfig
from berth.controlplane.server import ControlPlaneServer
from berth.scheduler.core import Scheduler
from berth.scheduler.events import EventBus
from berth.scheduler.models import AppDefinition, parse_app
from berth.store.client import StoreClient

# Answers 200 on every path except /health, which follows the file $HEALTH_FILE when set.
SERVER = (
    "import http.server,os\n"
    "flag = os.environ.get('HEALTH_FILE')\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        ok = not flag or os.path.exists(flag)\n"
    "        self.send_response(200 if ok else 503); self.end_headers(); self.wfile.write(b'ok')\n"
    "    def log_message(self, *a): pass\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT0'])), H)"
    ".serve_forever()\n"
)


# On SIGTERM, records what the store's catalog says about its service at that moment.
RECORDS_CATALOG_ON_SIGTERM = (
    "import os,signal,urllib.request\n"
    "def term(*_):\n"
    "    url = os.environ['STORE'] + '/v1/health/service/' + os.environ['SVC']\n"
    "    body = urllib.request.urlopen(url).read()\n"
    "    with open(os.path.join(os.environ['OUT'], os.environ['MESOS_TASK_ID']), 'wb') as f:\n"
    "        f.write(body)\n"
    "    os._exit(0)\n"
    "signal.signal(signal.SIGTERM, term)\n" + SERVER
)


def http_app(app_id: str, instances: int = 1, **extra: Any) -> AppDefinition:
    doc: dict[str, Any] = {
        "id": app_id,
        "args": [sys.executable, "-c", SERVER],
        "instances": instances,
        "cpus": 0.1,
        "mem": 128,
        "portDefinitions": [{"port": 0}],
        "taskKillGracePeriodSeconds": 2,
        "healthChecks": [
            {
                "protocol": "HTTP",
                "path": "/health",
                "gracePeriodSeconds": 30,
                "intervalSeconds": 1,
                "timeoutSeconds": 2,
                "maxConsecutiveFailures": 2,
            }
        ],
    }
    doc.update(extra)
    return parse_app(doc)


@dataclass
class Plane:
    server: ControlPlaneServer
    scheduler: Scheduler
    events: EventBus
    store: StoreClient

    @property
    def url(self) -> str:
        return self.server.url


@asynccontextmanager
async def control_plane(data_dir: Path, **scheduler_config: Any) -> AsyncIterator[Plane]:
    """``scheduler_config`` overrides SchedulerConfig fields (short timers for tests)."""
    server = ControlPlaneServer(ControlPlaneConfig(port=0, data_dir=data_dir))
    component: Any = server.app.components[-1]
    if scheduler_config:
        config = component.scheduler.config.model_copy(update=scheduler_config)
        component.scheduler.config = config
    await server.start()
    store = StoreClient(server.url)
    try:
        await component.scheduler.wait_ready()
        yield Plane(server, component.scheduler, component.events, store)
    finally:
        await store.close()
        await server.stop()


class Events:
    """Subscribe before acting, then await the event the action causes."""

    def __init__(self, bus: EventBus, types: set[str] | None = None) -> None:
        self._sub = bus.subscribe(types)
        self.seen: list[dict[str, Any]] = []

    def close(self) -> None:
        self._sub.close()

    async def stream(self, timeout: float = 60) -> AsyncIterator[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            async for event in self._sub:
                self.seen.append(event)
                yield event

    def mark(self) -> int:
        """A position in ``seen``; ``wait_for(since=mark)`` also matches events after it
        that an earlier ``wait_for`` already read past."""
        return len(self.seen)

    async def wait_for(
        self,
        event_type: str,
        timeout: float = 60,
        where: Callable[[dict[str, Any]], bool] | None = None,
        since: int | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        def matches(event: dict[str, Any]) -> bool:
            return (
                event["eventType"] == event_type
                and all(event.get(k) == v for k, v in fields.items())
                and (where is None or where(event))
            )

        if since is not None:
            for event in self.seen[since:]:
                if matches(event):
                    return event
        async with asyncio.timeout(timeout):
            async for event in self._sub:
                self.seen.append(event)
                if matches(event):
                    return event
        raise AssertionError(f"event stream ended before {event_type} {fields}")


def processes_with_env(name: str, value: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment has ``name=value``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(name) == value:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def task_processes(app_id: str) -> list[psutil.Process]:
    """Live processes started for ``app_id`` (they all carry MARATHON_APP_ID)."""
    return processes_with_env("MARATHON_APP_ID", app_id)


def tagged(task_id: str) -> list[psutil.Process]:
    """Live processes of one task, descendants included (they carry MESOS_TASK_ID)."""
    return processes_with_env("MESOS_TASK_ID", task_id)


def wait_gone(task_id: str, timeout: float = 10) -> bool:
    # Nothing to await across processes: poll the process table with a deadline.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not tagged(task_id):
            return True
        time.sleep(0.05)
    return False


def wait_until(check: Callable[[], bool], timeout: float = 30, what: str = "condition") -> None:
    """Poll with a deadline, for what no event announces (another process exiting)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def await_until(
    check: Callable[[], bool], timeout: float = 30, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
