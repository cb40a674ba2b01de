"""Tasks in the store catalog, and label-driven gateway routes.

A healthy task is registered as service ``app.service_name`` with ID = task
id, so gateways (and any Consul client) find it through
``/v1/health/service/<name>?passing``. It is deregistered *before* it is
stopped and only after the store acknowledged, so routing stops first.

Routes: labels ``BERTH_VHOST`` and marathon-lb's ``HAPROXY_0_VHOST`` (comma
separated hosts) become ``berth/gateway/routes/<host>`` = ``{"cluster":
"<service>"}``. Only keys still holding exactly what the scheduler wrote are
removed, so a route an operator edited by hand is left alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from berth.scheduler.models import VHOST_LABELS, AppDefinition
from berth.scheduler.state import Task
from berth.store.client import StoreClient
from berth.store.errors import StoreUnavailable

log = logging.getLogger("berth.scheduler.registry")

ROUTES = "berth/gateway/routes/"
T = TypeVar("T")


def vhosts(labels: Mapping[str, str]) -> set[str]:
    hosts: set[str] = set()
    for name in VHOST_LABELS:
        for host in labels.get(name, "").split(","):
            host = host.strip().lower()
            if host:
                hosts.add(host)
    return hosts


def route_doc(app: AppDefinition) -> dict[str, Any]:
    return {"cluster": app.service_name}


def registration(app: AppDefinition, task: Task) -> dict[str, Any]:
    """The catalog entry of a task (pure): service, address, tags, meta and its check."""
    port = task.ports[0]
    check: dict[str, Any]
    http = next((h for h in app.health_checks if h.protocol in ("HTTP", "MESOS_HTTP")), None)
    interval = f"{http.interval_seconds if http else 10}s"
    if http is not None:
        check_port = http.port or (
            task.ports[http.port_index] if http.port_index < len(task.ports) else port
        )
        check = {"HTTP": f"http://{task.host}:{check_port}{http.path}", "Interval": interval}
    else:
        check = {"TCP": f"{task.host}:{port}", "Interval": interval}
    # Registered only once the scheduler saw it healthy: start passing, not Consul's critical.
    check.update(Status="passing", Timeout="5s", Name=f"task {task.id}")
    return {
        "name": app.service_name,
        "service_id": task.id,
        "address": task.host,
        "port": port,
        "tags": sorted(f"{k}={v}" if v else k for k, v in app.labels.items()),
        "meta": {
            "marathon_app_id": app.id,
            "marathon_app_version": app.version,
            "mesos_task_id": task.id,
        },
        "check": check,
    }


class Registry:
    """Catalog writes per task, serialised per task so a deregistration can never be
    overtaken by a registration still in flight (which would leave a dead task routed)."""

    def __init__(self, store: StoreClient, ack_timeout: float) -> None:
        self.store = store
        self.ack_timeout = ack_timeout
        # Tasks meant to be in the catalog (set before the store call, so a stop that
        # races a registration still deregisters).
        self.registered: set[str] = set()
        self.quiet = False
        self._locks: dict[str, asyncio.Lock] = {}

    def __repr__(self) -> str:
        return f"<Registry registered={len(self.registered)}>"

    async def _retry(self, what: str, call: Callable[[], Awaitable[T]]) -> bool:
        deadline = time.monotonic() + self.ack_timeout
        delay = 0.05
        while True:
            try:
                await call()
                return True
            except StoreUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    # At shutdown the embedded store is already gone; recovery cleans up.
                    level = logging.DEBUG if self.quiet else logging.WARNING
                    log.log(level, "%s: store unavailable (%s); giving up", what, exc)
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def register(self, app: AppDefinition, task: Task) -> bool:
        """True once the store acknowledged the task's entry."""
        if not task.ports:
            return False
        doc = registration(app, task)
        self.registered.add(task.id)
        lock = self._locks.setdefault(task.id, asyncio.Lock())
        async with lock:
            if task.id not in self.registered:
                return False  # deregistered while we waited: stay out
            return await self._retry(
                f"register {task.id}", lambda: self.store.register_service(**doc)
            )

    async def deregister(self, task_id: str) -> None:
        """Returns once the store acknowledged (or the ack timeout passed)."""
        if task_id not in self.registered:
            return
        self.registered.discard(task_id)
        lock = self._locks.setdefault(task_id, asyncio.Lock())
        async with lock:
            await self._retry(
                f"deregister {task_id}", lambda: self.store.deregister_service(task_id)
            )
        if task_id not in self.registered:
            self._locks.pop(task_id, None)

    async def deregister_stale(self, task_ids: set[str], services_of_apps: set[str]) -> int:
        """Remove catalog entries of tasks a previous control plane left (recovery):
        the stored tasks, and task entries (Meta mesos_task_id) of the apps' services."""
        services = await self.store.agent_services()
        removed = 0
        for service_id, svc in services.items():
            meta = svc.get("Meta") or {} if isinstance(svc, dict) else {}
            ours = "mesos_task_id" in meta and svc.get("Service") in services_of_apps
            if service_id in task_ids or ours:
                await self.store.deregister_service(service_id)
                removed += 1
        return removed

    async def sync_routes(self, old: AppDefinition | None, new: AppDefinition | None) -> None:
        """Write the routes of ``new``'s vhost labels; remove those only ``old`` had."""
        want = vhosts(new.labels) if new else set()
        had = vhosts(old.labels) if old else set()
        for host in sorted(want):
            assert new is not None
            await self.store.kv_put_json(ROUTES + host, route_doc(new))
        for host in sorted(had - want):
            assert old is not None
            await self._remove_route(host, route_doc(old))

    async def _remove_route(self, host: str, written: Mapping[str, Any]) -> None:
        entry = await self.store.kv_get(ROUTES + host)
        if entry is None:
            return
        try:
            current = entry.json()
        except json.JSONDecodeError:
            return
        if current == written:
            await self.store.kv_delete(ROUTES + host, cas=entry.modify_index)
