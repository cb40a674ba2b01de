"""The scheduler: apps, tasks and deployments, kept converging by one reconcile loop.

API calls, task exits, health changes and backoff timers only change state and
set ``_wake``; the loop then asks :func:`plan.plan_app` what to do per app and
does it. A new task counts for a deployment once it is healthy *and* the store
acknowledged its catalog entry; stopping a task (deregister, drain, SIGTERM,
grace, SIGKILL) runs in the background so a slow task never stalls the loop.
Together these keep a rolling restart from failing requests at the gateway.

Shutdown (``stop``): tasks are stopped, not left for re-adoption. They cannot
outlive the control plane anyway (see ``driver/process.py``), and ``berth up``
expects no process left behind; the next start launches fresh tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from berth.scheduler import models, tasklog
from berth.scheduler.config import SchedulerConfig
from berth.scheduler.driver.base import Driver, Exit, LaunchSpec, TaskEnv, TaskHandle, marathon_env
from berth.scheduler.driver.limits import Limiter
from berth.scheduler.driver.process import ProcessDriver
from berth.scheduler.errors import (
    AppExists,
    AppLocked,
    LaunchFailed,
    UnknownApp,
    UnknownDeployment,
    UnknownTask,
    UnsupportedApp,
)
from berth.scheduler.events import EventBus
from berth.scheduler.health import Probes, TaskHealth
from berth.scheduler.models import AppDefinition
from berth.scheduler.plan import Target, backoff_delay, backoff_settled, plan_app
from berth.scheduler.ports import NoPortsLeft, PortAllocator
from berth.scheduler.registry import Registry
from berth.scheduler.state import (
    AppStatus,
    Deployment,
    HealthResult,
    QueueEntry,
    StateStore,
    Task,
    TaskState,
    now_iso,
)
from berth.scheduler.usage import task_usage
from berth.store.client import Backoff, StoreClient
from berth.store.errors import StoreError, StoreRejected

__all__ = [
    "AppStatus",
    "Deployment",
    "HealthResult",
    "QueueEntry",
    "Scheduler",
    "Task",
    "TaskState",
]

log = logging.getLogger("berth.scheduler")

SLAVE_ID = models.LOCAL_AGENT_ID


@dataclass
class AppRuntime:
    """One app's desired definition and what the scheduler knows about its tasks."""

    app: AppDefinition
    tasks: dict[str, Task] = field(default_factory=dict)
    deleting: bool = False
    failures: int = 0
    delay_until: float | None = None
    since: str = field(default_factory=now_iso)
    last_failure: dict[str, Any] | None = None

    def __repr__(self) -> str:
        states = [t.state.name for t in self.tasks.values()]
        return f"<AppRuntime {self.app.id} tasks={states} failures={self.failures}>"

    def target(self) -> Target | None:
        if self.deleting:
            return None
        strategy = self.app.upgrade_strategy
        return Target(
            instances=self.app.instances,
            config_version=self.app.version_info.last_config_change_at,
            minimum_health_capacity=strategy.minimum_health_capacity,
            maximum_over_capacity=strategy.maximum_over_capacity,
        )


def _task_id(app_id: str) -> str:
    # Marathon's format: the app path with "/" -> "_", a dot, a UUID.
    return f"{app_id.lstrip('/').replace('/', '_')}.{uuid.uuid4()}"


def _restarted(app: AppDefinition) -> AppDefinition:
    version = models.next_version(app.version)
    info = models.VersionInfo(last_scaling_at=version, last_config_change_at=version)
    raw = dict(app.raw)
    raw["version"] = version
    raw["versionInfo"] = {"lastScalingAt": version, "lastConfigChangeAt": version}
    return replace(app, version=version, version_info=info, raw=raw)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        store: StoreClient,
        events: EventBus,
        driver: Driver | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.events = events
        self.state = StateStore(store)
        self.registry = Registry(store, config.store_ack_timeout_seconds)
        self.ports = PortAllocator(config.host, config.port_range_min, config.port_range_max)
        self.driver: Driver = driver or ProcessDriver(
            config.data_dir / "sandboxes",
            Limiter(config.limits),
            config.log_max_size_bytes,
            config.log_max_files,
        )
        self._probes: Probes | None = None
        self._apps: dict[str, AppRuntime] = {}
        self._handles: dict[str, TaskHandle] = {}
        self._health: dict[str, TaskHealth] = {}
        self._deployments: dict[str, Deployment] = {}
        self._locks: dict[str, str] = {}  # app id -> deployment id
        self._background: set[asyncio.Task[Any]] = set()
        self._wake = asyncio.Event()
        self._loaded = asyncio.Event()
        self._mutex = asyncio.Lock()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        tasks = sum(len(rt.tasks) for rt in self._apps.values())
        phase = (
            "stopping"
            if self._stopping
            else "running"
            if self._loaded.is_set()
            else "recovering"
            if self._runner
            else "new"
        )
        return (
            f"<Scheduler {phase} apps={len(self._apps)} tasks={tasks} "
            f"deployments={len(self._deployments)} limits={self.limits_in_force}>"
        )

    @property
    def limits_in_force(self) -> str:
        """How task resources are limited on this host: cgroup-v2, cgroup-v1, rlimit or none."""
        limiter = getattr(self.driver, "limiter", None)
        return str(getattr(limiter, "kind", "none"))

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Returns at once: the store may only answer once the control plane serves."""
        self._probes = Probes(getattr(self.driver, "reaper", None))
        self._runner = asyncio.create_task(self._run(), name="scheduler")
        log.info("scheduler: task limits via %s", self.limits_in_force)

    async def wait_ready(self) -> None:
        await self._loaded.wait()

    async def stop(self) -> None:
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for health in list(self._health.values()):
            await health.stop()
        self._health.clear()
        # The store is often already gone at shutdown (it is served by this process):
        # deregister best-effort and quickly; the next start cleans up what is left.
        self.registry.ack_timeout = min(self.registry.ack_timeout, 0.5)
        self.registry.quiet = True
        stops = [
            self._stop_task(rt, task, "control plane stopping")
            for rt in self._apps.values()
            for task in rt.tasks.values()
            if task.id in self._handles
        ]
        await asyncio.gather(*stops, return_exceptions=True)
        for job in list(self._background):
            job.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._probes is not None:
            await self._probes.close()
        self.driver.close()

    async def _run(self) -> None:
        await self._recover()
        self._loaded.set()
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            async with self._mutex:
                for rt in list(self._apps.values()):
                    try:
                        await self._reconcile(rt)
                    except StoreError as exc:
                        log.warning("reconcile %s: store error %s; retrying", rt.app.id, exc)
                        self._wake_later(1.0)
                    except Exception:
                        # One app's bug must not stop supervision of every other app.
                        log.exception("reconcile %s failed; retrying", rt.app.id)
                        self._wake_later(1.0)

    def _wake_later(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(max(delay, 0.0), self._wake.set)

    def _spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def _recover(self) -> None:
        backoff = Backoff(self.config.store_retry_max_delay_seconds)
        while True:
            try:
                apps, tasks, deployments = await self.state.load()
                break
            except StoreError as exc:
                log.info("scheduler: store not ready (%s); retrying", exc)
                await asyncio.sleep(backoff.next())
        for doc in apps:
            try:
                app = models.from_json(doc)
            except models.ValidationFailed as exc:
                log.error("stored app %s is invalid, skipped: %s", doc.get("id"), exc.details)
                continue
            except (AttributeError, TypeError, ValueError) as exc:
                log.error("stored app %s is unreadable, skipped: %s", doc.get("id"), exc)
                continue
            self._apps[app.id] = AppRuntime(app)
        # Tasks of a previous control plane died with it; reap any leftover descendant,
        # then report them lost. The reconcile loop starts fresh ones: never two per slot.
        stale = {t.id: (t.pid, t.create_time) for t in tasks}
        reaped = self.driver.reap_orphans(stale)
        for task in tasks:
            task.state = TaskState.LOST
            task.message = "control plane restarted; task replaced"
            self._publish_status(task)
            with contextlib.suppress(StoreError):
                await self.state.delete_task(task.id)
        try:
            names = {rt.app.service_name for rt in self._apps.values()}
            await self.registry.deregister_stale(set(stale), names)
            for rt in self._apps.values():
                await self.registry.sync_routes(None, rt.app)
        except StoreError as exc:
            log.warning("recovery: could not clean the catalog/routes: %s", exc)
        for dep in deployments:
            live = [a for a in dep.affected_apps if a in self._apps]
            if live:
                self._deployments[dep.id] = dep
                for app_id in live:
                    self._locks[app_id] = dep.id
                # A delete interrupted by the restart goes on: the app is not revived.
                for action, app_id in (a for step in dep.steps for a in step):
                    if action == "StopApplication" and app_id in self._apps:
                        self._apps[app_id].deleting = True
            else:
                with contextlib.suppress(StoreError):
                    await self.state.delete_deployment(dep.id)
        log.info(
            "scheduler recovered %d apps, %d deployments; %d stale tasks (%d processes reaped)",
            len(self._apps),
            len(self._deployments),
            len(tasks),
            reaped,
        )

    # -- reads (for the API) -------------------------------------------------------

    def apps(self) -> list[AppDefinition]:
        return [
            rt.app for rt in sorted(self._apps.values(), key=lambda r: r.app.id) if not rt.deleting
        ]

    def app(self, app_id: str) -> AppDefinition | None:
        rt = self._apps.get(app_id)
        return None if rt is None or rt.deleting else rt.app

    def usage(self) -> dict[str, Any]:
        """Limits in force and current use per task; blocking, call it in a thread."""
        return task_usage(self.tasks(), getattr(self.driver, "limiter", None))

    def tasks(self, app_id: str | None = None) -> list[Task]:
        if app_id is None:
            runtimes = list(self._apps.values())
        else:
            runtimes = [self._apps[app_id]] if app_id in self._apps else []
        return [t for rt in runtimes for t in rt.tasks.values()]

    def status(self, app_id: str) -> AppStatus:
        rt = self._apps.get(app_id)
        if rt is None:
            raise UnknownApp(app_id)
        tasks = list(rt.tasks.values())
        dep = self._deployments.get(self._locks.get(app_id, ""))
        return AppStatus(
            tasks=tasks,
            staged=sum(1 for t in tasks if t.state.is_staged),
            running=sum(1 for t in tasks if t.state is TaskState.RUNNING),
            # Marathon counts healthy/unhealthy only for tasks with health check results.
            healthy=sum(1 for t in tasks if t.health_results and t.healthy),
            unhealthy=sum(1 for t in tasks if t.unhealthy),
            deployments=[dep] if dep else [],
            last_task_failure=rt.last_failure,
        )

    def deployments(self) -> list[Deployment]:
        return list(self._deployments.values())

    def queue(self) -> list[QueueEntry]:
        now = time.monotonic()
        out: list[QueueEntry] = []
        for rt in self._apps.values():
            if rt.deleting:
                continue
            current = rt.app.version_info.last_config_change_at
            active = sum(
                1 for t in rt.tasks.values() if t.state.is_active and t.config_version == current
            )
            delayed = rt.delay_until is not None and rt.delay_until > now
            count = max(0, rt.app.instances - active)
            if count or delayed:
                out.append(
                    QueueEntry(rt.app.id, count, rt.delay_until if delayed else None, rt.since)
                )
        return out

    # -- changes (for the API) -----------------------------------------------------

    async def create_app(self, app: AppDefinition) -> Deployment:
        await self._loaded.wait()
        self.driver.check(app)
        async with self._mutex:
            existing = self._apps.get(app.id)
            if existing is not None:
                if existing.deleting:
                    raise AppLocked([self._locks[app.id]] if app.id in self._locks else [])
                raise AppExists(app.id)
            await self._put_app(app)
            self._apps[app.id] = AppRuntime(app)
            await self.registry.sync_routes(None, app)
            dep = await self._deploy(
                [[("StartApplication", app.id)], [("ScaleApplication", app.id)]], None, app
            )
            await self._step_done(dep)
        self._wake.set()
        return dep

    async def update_app(self, app: AppDefinition, force: bool) -> Deployment:
        await self._loaded.wait()
        if app.id not in self._apps:
            return await self.create_app(app)
        self.driver.check(app)
        async with self._mutex:
            rt = self._require(app.id)
            if not force and app.id in self._locks:
                raise AppLocked([self._locks[app.id]])
            await self._put_app(app)
            # Only once the new definition is stored: a refused update cancels nothing.
            await self._unlock(app.id, force)
            old = rt.app
            rt.app = app
            await self.registry.sync_routes(old, app)
            config_change = (
                old.version_info.last_config_change_at != app.version_info.last_config_change_at
            )
            if config_change:
                # A new definition may fix what made tasks fail: launch without delay.
                rt.failures, rt.delay_until = 0, None
            action = "RestartApplication" if config_change else "ScaleApplication"
            dep = await self._deploy([[(action, app.id)]], old, app)
        self._wake.set()
        return dep

    async def restart_app(self, app_id: str, force: bool) -> Deployment:
        await self._loaded.wait()
        rt = self._require(app_id)
        return await self.update_app(_restarted(rt.app), force)

    async def delete_app(self, app_id: str, force: bool) -> Deployment:
        await self._loaded.wait()
        async with self._mutex:
            rt = self._require(app_id)
            await self._unlock(app_id, force)
            rt.deleting = True
            dep = await self._deploy([[("StopApplication", app_id)]], rt.app, None)
        self._wake.set()
        return dep

    async def kill_tasks(
        self, task_ids: list[str], scale: bool, wipe: bool = False
    ) -> list[Task] | Deployment:
        """Kill tasks; with ``scale`` the app shrinks by as many (a deployment), else
        they are replaced. ``wipe`` means nothing extra here: no task keeps local state."""
        await self._loaded.wait()
        found: list[tuple[AppRuntime, Task]] = []
        for task_id in task_ids:
            hit = next(
                ((rt, rt.tasks[task_id]) for rt in self._apps.values() if task_id in rt.tasks),
                None,
            )
            if hit is None:
                raise UnknownTask(task_id)
            found.append(hit)
        dep: Deployment | None = None
        if scale:
            by_app: dict[str, list[Task]] = {}
            for rt, task in found:
                if task.state.is_active:
                    by_app.setdefault(rt.app.id, []).append(task)
            async with self._mutex:
                for app_id, tasks in by_app.items():
                    rt = self._apps[app_id]
                    app = models.with_instances(rt.app, max(0, rt.app.instances - len(tasks)))
                    await self._put_app(app)
                    old, rt.app = rt.app, app
                    # Supersedes (fails) a deployment in progress, as ?force would: left
                    # alone it would stay listed, with nothing ever finishing it.
                    await self._unlock(app_id, force=True)
                    dep = await self._deploy([[("ScaleApplication", app_id)]], old, app)
        for rt, task in found:
            self._kill(rt, task, "killed through the API")
        self._wake.set()
        if scale:
            if dep is None:
                # Nothing was running: Marathon still answers with a (finished) deployment.
                dep = Deployment(str(uuid.uuid4()), models.now_timestamp(), [], [], 0, 0)
            return dep
        return [task for _, task in found]

    async def cancel_deployment(self, deployment_id: str, force: bool) -> Deployment | None:
        await self._loaded.wait()
        dep = self._deployments.get(deployment_id)
        if dep is None:
            raise UnknownDeployment(deployment_id)
        async with self._mutex:
            await self._finish(dep, success=False)
        if force:
            return None
        # Rollback: deploy the definition from before (or remove an app that was new).
        app_id = dep.affected_apps[0]
        if dep.original is None:
            return await self.delete_app(app_id, force=True)
        previous = models.from_json(dep.original)
        rt = self._apps.get(app_id)
        if rt is not None and rt.deleting:
            rt.deleting = False
        version = models.next_version(rt.app.version if rt else previous.version)
        raw = dict(previous.raw)
        raw["version"] = version
        rolled = replace(previous, version=version, raw=raw)
        if rt is None:
            return await self.create_app(rolled)
        return await self.update_app(rolled, force=True)

    async def reset_delay(self, app_id: str) -> None:
        rt = self._require(app_id)
        rt.failures, rt.delay_until = 0, None
        self._wake.set()

    async def _put_app(self, app: AppDefinition) -> None:
        try:
            await self.state.put_app(app.id, models.to_json(app))
        except StoreRejected as exc:
            # e.g. larger than the store's value limit: the definition is the problem.
            raise UnsupportedApp("/", f"the store refused the app definition: {exc}") from exc

    def _require(self, app_id: str) -> AppRuntime:
        rt = self._apps.get(app_id)
        if rt is None or rt.deleting:
            raise UnknownApp(app_id)
        return rt

    async def _unlock(self, app_id: str, force: bool) -> None:
        dep_id = self._locks.get(app_id)
        if dep_id is None:
            return
        if not force:
            raise AppLocked([dep_id])
        dep = self._deployments.get(dep_id)
        if dep is not None:
            await self._finish(dep, success=False)

    # -- deployments ---------------------------------------------------------------

    async def _deploy(
        self,
        steps: list[list[tuple[str, str]]],
        original: AppDefinition | None,
        target: AppDefinition | None,
    ) -> Deployment:
        version = target.version if target else models.next_version(None)
        dep = Deployment(
            id=str(uuid.uuid4()),
            version=version,
            affected_apps=sorted({a for step in steps for _, a in step}),
            steps=steps,
            current_step=1,
            total_steps=len(steps),
            original=models.to_json(original) if original else None,
        )
        self._deployments[dep.id] = dep
        for app_id in dep.affected_apps:
            self._locks[app_id] = dep.id
        await self.state.put_deployment(dep)
        self.events.publish("deployment_info", self._plan_event(dep))
        return dep

    def _plan_event(self, dep: Deployment) -> dict[str, Any]:
        original = [dep.original] if dep.original else []
        target = [
            models.to_json(self._apps[a].app)
            for a in dep.affected_apps
            if a in self._apps and not self._apps[a].deleting
        ]
        return {
            "plan": {
                "id": dep.id,
                "version": dep.version,
                "original": {"id": "/", "apps": original},
                "target": {"id": "/", "apps": target},
                "steps": [
                    {"actions": [{"action": a, "app": app} for a, app in step]}
                    for step in dep.steps
                ],
            },
            "currentStep": dep.current_step,
        }

    async def _step_done(self, dep: Deployment) -> None:
        self.events.publish("deployment_step_success", self._plan_event(dep))
        if dep.current_step >= dep.total_steps:
            await self._finish(dep, success=True)
            return
        dep.current_step += 1
        with contextlib.suppress(StoreError):
            await self.state.put_deployment(dep)
        self.events.publish("deployment_info", self._plan_event(dep))

    async def _finish(self, dep: Deployment, *, success: bool) -> None:
        self._deployments.pop(dep.id, None)
        for app_id in dep.affected_apps:
            if self._locks.get(app_id) == dep.id:
                del self._locks[app_id]
        self.events.publish(
            "deployment_success" if success else "deployment_failed",
            {
                "id": dep.id,
                "plan": self._plan_event(dep)["plan"],
            },
        )
        with contextlib.suppress(StoreError):
            await self.state.delete_deployment(dep.id)

    # -- reconcile -----------------------------------------------------------------

    async def _reconcile(self, rt: AppRuntime) -> None:
        now = time.monotonic()
        target = rt.target()
        self._maybe_reset_backoff(rt, now)
        allowed = rt.delay_until is None or now >= rt.delay_until
        tasks = [t for t in rt.tasks.values() if not t.state.is_terminal]
        plan = plan_app(target, tasks, launch_allowed=allowed)
        for task_id in plan.kill:
            self._kill(rt, rt.tasks[task_id], plan.reasons.get(task_id, "not needed"))
        launched = 0
        for _ in range(plan.start):
            if not await self._launch(rt):
                break
            launched += 1
        if launched:
            # New tasks change what converged means (no health check: healthy once
            # RUNNING); look again rather than wait for an unrelated event.
            self._wake.set()
        if plan.delayed and rt.delay_until is not None:
            self._wake_later(rt.delay_until - now)
        killing = any(t.state is TaskState.KILLING for t in rt.tasks.values())
        dep = self._deployments.get(self._locks.get(rt.app.id, ""))
        if plan.converged and not killing:
            # A delete's deployment succeeds only once the app is gone from the store.
            if rt.deleting:
                await self._remove_app(rt)
            if dep is not None:
                await self._step_done(dep)

    def _maybe_reset_backoff(self, rt: AppRuntime, now: float) -> None:
        if rt.failures == 0:
            return
        current = rt.app.version_info.last_config_change_at
        tasks = list(rt.tasks.values())
        if backoff_settled(tasks, current, now, self.config.backoff_reset_seconds):
            rt.failures, rt.delay_until = 0, None

    async def _remove_app(self, rt: AppRuntime) -> None:
        app_id = rt.app.id
        await self.state.delete_app(app_id)
        await self.registry.sync_routes(rt.app, None)
        self._apps.pop(app_id, None)
        self.events.publish("app_terminated_event", {"appId": app_id})

    async def _launch(self, rt: AppRuntime) -> bool:
        app = rt.app
        task_id = _task_id(app.id)
        requested = [p.port for p in app.port_definitions] if app.require_ports else []
        try:
            ports = self.ports.allocate(len(app.port_definitions), requested)
        except NoPortsLeft as exc:
            self._record_failure(rt, None, f"no ports: {exc}")
            return False
        task = Task(
            id=task_id,
            app_id=app.id,
            host=self.config.host,
            ports=ports,
            state=TaskState.STAGING,
            staged_at=now_iso(),
            started_at=None,
            version=app.version,
            config_version=app.version_info.last_config_change_at,
        )
        rt.tasks[task_id] = task
        self._publish_status(task)
        env = marathon_env(app, TaskEnv(self.config.host, ports, task_id))
        log_path = self._log_dir(app) / f"{task_id}.log"
        spec = LaunchSpec(task_id, app.id, app.cmd, app.args, env, app.cpus, app.mem, log_path)
        try:
            handle = await self.driver.launch(spec)
        except Exception as exc:
            if not isinstance(exc, LaunchFailed):
                # A driver bug must fail this task (and back off), not wedge it in STAGING.
                log.exception("launching %s failed", task_id)
            self.ports.release(ports)
            del rt.tasks[task_id]
            task.state = TaskState.FAILED
            task.message = str(exc) if isinstance(exc, LaunchFailed) else f"driver error: {exc!r}"
            self._publish_status(task)
            self._record_failure(rt, task, task.message)
            return False
        self._handles[task_id] = handle
        self._spawn(self._watch(rt, task, handle))
        if task.state is TaskState.KILLING:
            # Killed (API) while it was being launched: stop it now that it has a handle.
            self._spawn(self._stop_task(rt, task, task.message))
            return True
        task.pid = handle.pid
        task.create_time = handle.create_time
        task.limits_in_force = handle.limits_in_force
        task.state = TaskState.RUNNING
        task.started_at = now_iso()
        task.running_mono = time.monotonic()
        self._publish_status(task)
        self._spawn(self._persist_task(task))
        if app.health_checks and self._probes is not None:
            health = TaskHealth(
                task,
                app.health_checks,
                env,
                self._probes,
                initial_probe_seconds=self.config.health_initial_probe_seconds,
                on_change=self._on_health_change,
                on_failure=self._on_health_failure,
                on_kill=self._on_unhealthy,
            )
            self._health[task_id] = health
            health.start()
        else:
            self._spawn(self._register(rt, task))
        if rt.failures:
            self._wake_later(self.config.backoff_reset_seconds + 0.05)
        return True

    def _log_dir(self, app: AppDefinition) -> Path:
        return self.config.task_log_dir / app.service_name

    async def _persist_task(self, task: Task) -> None:
        try:
            await self.state.put_task(task)
        except StoreError as exc:
            log.warning("could not persist task %s: %s", task.id, exc)

    async def _watch(self, rt: AppRuntime, task: Task, handle: TaskHandle) -> None:
        exit_ = await handle.wait()
        await self._finalize(rt, task, exit_)

    async def _finalize(self, rt: AppRuntime, task: Task, exit_: Exit) -> None:
        self._handles.pop(task.id, None)
        health = self._health.pop(task.id, None)
        if health is not None:
            await health.stop()
        await self.registry.deregister(task.id)
        self.ports.release(task.ports)
        killed = task.state is TaskState.KILLING and not exit_.oom
        if killed:
            task.state = TaskState.KILLED
        elif exit_.succeeded:
            task.state = TaskState.FINISHED
        else:
            task.state = TaskState.FAILED
        task.message = exit_.message
        self._publish_status(task)
        if not killed:
            log.warning("task %s of %s ended: %s", task.id, rt.app.id, exit_.message)
            self._record_failure(rt, task, exit_.message)
        rt.tasks.pop(task.id, None)
        try:
            tasklog.prune(self._log_dir(rt.app), self.config.log_keep_ended_tasks, set(rt.tasks))
        except OSError as exc:
            log.warning("could not prune task logs of %s: %s", rt.app.id, exc)
        # Reconcile before the store round trip: a deployment waiting on this exit
        # finishes right behind its status update.
        self._wake.set()
        with contextlib.suppress(StoreError):
            await self.state.delete_task(task.id)

    def _record_failure(self, rt: AppRuntime, task: Task | None, message: str) -> None:
        app = rt.app
        rt.failures += 1
        delay = backoff_delay(
            rt.failures, app.backoff_seconds, app.backoff_factor, app.max_launch_delay_seconds
        )
        rt.delay_until = time.monotonic() + delay
        rt.since = now_iso()
        self._wake_later(delay)
        if task is not None:
            rt.last_failure = {
                "appId": app.id,
                "host": task.host,
                "message": message,
                "state": task.state.value,
                "taskId": task.id,
                "slaveId": SLAVE_ID,
                "timestamp": now_iso(),
                "version": task.version,
            }

    def _kill(self, rt: AppRuntime, task: Task, reason: str) -> None:
        if not task.state.is_active:
            return
        task.state = TaskState.KILLING
        task.message = reason
        self._publish_status(task)
        self._spawn(self._stop_task(rt, task, reason))

    async def _stop_task(self, rt: AppRuntime, task: Task, reason: str) -> None:
        task.state = TaskState.KILLING
        health = self._health.pop(task.id, None)
        if health is not None:
            await health.stop()
        # Out of the catalog first, acknowledged, so gateways stop routing before SIGTERM.
        routed = task.id in self.registry.registered
        task.in_catalog = False
        await self.registry.deregister(task.id)
        if routed and not self._stopping and self.config.drain_seconds > 0:
            await asyncio.sleep(self.config.drain_seconds)
        handle = self._handles.get(task.id)
        if handle is not None:
            grace = rt.app.task_kill_grace_period_seconds
            if self._stopping:
                grace = min(grace, self.config.shutdown_grace_seconds)
            await handle.stop(grace)

    # -- health callbacks ------------------------------------------------------------

    def _on_health_change(self, task: Task, index: int, result: HealthResult) -> None:
        self.events.publish(
            "health_status_changed_event",
            {
                "appId": task.app_id,
                "taskId": task.id,
                "instanceId": task.id,
                "version": task.version,
                "alive": result.alive,
            },
        )
        rt = self._apps.get(task.app_id)
        if rt is None or task.state is not TaskState.RUNNING:
            return
        if task.healthy and task.id not in self.registry.registered:
            self._spawn(self._register(rt, task))
        elif not task.healthy and task.id in self.registry.registered:
            task.in_catalog = False
            self._spawn(self.registry.deregister(task.id))
        self._wake.set()

    async def _register(self, rt: AppRuntime, task: Task) -> None:
        """Into the catalog until the store acknowledges, then let deployments go on."""
        backoff = Backoff(2.0)
        while task.state is TaskState.RUNNING and task.healthy:
            if await self.registry.register(rt.app, task):
                task.in_catalog = task.id in self.registry.registered
                self._wake.set()
                return
            if not task.ports or task.id not in self.registry.registered:
                return
            await asyncio.sleep(backoff.next())

    def _on_health_failure(self, task: Task, index: int, result: HealthResult) -> None:
        rt = self._apps.get(task.app_id)
        check = rt.app.raw.get("healthChecks", [{}])[index] if rt else {}
        self.events.publish(
            "failed_health_check_event",
            {
                "appId": task.app_id,
                "taskId": task.id,
                "instanceId": task.id,
                "version": task.version,
                "healthCheck": check,
            },
        )

    def _on_unhealthy(self, task: Task, reason: str) -> None:
        rt = self._apps.get(task.app_id)
        self.events.publish(
            "unhealthy_task_kill_event",
            {
                "appId": task.app_id,
                "taskId": task.id,
                "instanceId": task.id,
                "version": task.version,
                "reason": reason,
                "host": task.host,
                "slaveId": SLAVE_ID,
            },
        )
        if rt is not None:
            # Detached from the health loop: it is the one calling us and gets cancelled.
            asyncio.get_running_loop().call_soon(self._kill, rt, task, reason)
        self._wake.set()

    def _publish_status(self, task: Task) -> None:
        self.events.publish(
            "status_update_event",
            {
                "slaveId": SLAVE_ID,
                "taskId": task.id,
                "taskStatus": task.state.value,
                "message": task.message,
                "appId": task.app_id,
                "host": task.host,
                "ipAddresses": [{"ipAddress": task.host, "protocol": "IPv4"}],
                "ports": task.ports,
                "version": task.version,
            },
        )
