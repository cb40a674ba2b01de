"""Marathon health checks for one task: HTTP(S), TCP and COMMAND.

Semantics (Marathon's healthCheck.raml): HTTP 200-399 is alive; TCP alive
when a connection opens; COMMAND alive when it exits 0. Failures inside
``gracePeriodSeconds`` are ignored until the first success. After
``maxConsecutiveFailures`` counted failures (0 = never) the task is reported
for killing. One deviation: until a task's first success, and only within its
grace period, it is probed every ``health_initial_probe_seconds`` (at most
``intervalSeconds``), so a fresh task turns healthy as soon as it listens rather
than up to a full interval later; those early failures are ignored anyway, so
nothing observable changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from berth.scheduler.driver.process import Reaper, die_with_parent
from berth.scheduler.models import HealthCheck
from berth.scheduler.state import HealthResult, Task, now_iso


@dataclass(frozen=True)
class Outcome:
    alive: bool
    cause: str = ""
    # An HTTP 1xx with ignoreHttp1xx: neither success nor failure.
    ignored: bool = False


class Probes:
    """The I/O of health checks, shared by every task (one HTTP client for all)."""

    def __init__(self, reaper: Reaper | None = None) -> None:
        # COMMAND checks are processes too: the driver's reaper sidecar kills what their
        # shell forked if the control plane dies mid-check (PDEATHSIG reaches only the shell).
        self._reaper = reaper
        # No keep-alive: like Marathon, every check opens a fresh connection, so a task
        # that stops accepting is noticed.
        limits = httpx.Limits(max_keepalive_connections=0)
        self._http = httpx.AsyncClient(limits=limits, follow_redirects=False)
        self._https = httpx.AsyncClient(limits=limits, follow_redirects=False, verify=False)

    def __repr__(self) -> str:
        return "<Probes http https tcp command>"

    async def close(self) -> None:
        await self._http.aclose()
        await self._https.aclose()

    async def run(
        self, check: HealthCheck, host: str, port: int | None, env: Mapping[str, str]
    ) -> Outcome:
        timeout = float(check.timeout_seconds)
        try:
            async with asyncio.timeout(timeout):
                if check.protocol in ("COMMAND",):
                    return await self._command(check.command or "true", env)
                if port is None:
                    return Outcome(False, "no port to check")
                if check.protocol in ("TCP", "MESOS_TCP"):
                    return await self._tcp(host, port)
                secure = check.protocol in ("HTTPS", "MESOS_HTTPS")
                return await self._get(check, host, port, secure)
        except TimeoutError:
            return Outcome(False, f"health check timed out after {timeout:g}s")

    async def _get(self, check: HealthCheck, host: str, port: int, secure: bool) -> Outcome:
        scheme = "https" if secure else "http"
        netloc = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{netloc}:{port}{check.path}"
        client = self._https if secure else self._http
        try:
            resp = await client.get(url, timeout=float(check.timeout_seconds))
        except httpx.HTTPError as exc:
            return Outcome(False, f"{type(exc).__name__}: {exc}")
        if 100 <= resp.status_code < 200 and check.ignore_http1xx:
            return Outcome(False, ignored=True)
        if 200 <= resp.status_code < 400:
            return Outcome(True)
        return Outcome(False, f"HTTP {resp.status_code} from {url}")

    async def _tcp(self, host: str, port: int) -> Outcome:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            return Outcome(False, f"TCP connect to {host}:{port} failed: {exc.strerror or exc}")
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return Outcome(True)

    async def _command(self, command: str, env: Mapping[str, str]) -> Outcome:
        parent = os.getpid()
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            start_new_session=True,
            # A check outliving a killed control plane would run on, timeout unenforced.
            preexec_fn=lambda: die_with_parent(parent),
        )
        key = f"health-check.{proc.pid}"
        if self._reaper is not None:
            self._reaper.add(key, proc.pid, ())
        try:
            _, err = await proc.communicate()
        except asyncio.CancelledError:
            # The whole group: what the shell forked holds the pipes open otherwise.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        finally:
            if self._reaper is not None:
                self._reaper.remove(key)
        if proc.returncode == 0:
            return Outcome(True)
        tail = err.decode("utf-8", "replace").strip()[-200:]
        return Outcome(
            False, f"command exited with {proc.returncode}" + (f": {tail}" if tail else "")
        )


def record(result: HealthResult, outcome: Outcome, in_grace: bool, when: str) -> bool:
    """Apply one outcome to ``result`` (pure); returns whether it counted as a failure."""
    if outcome.ignored:
        return False
    if outcome.alive:
        result.alive = True
        result.consecutive_failures = 0
        result.first_success = result.first_success or when
        result.last_success = when
        return False
    if in_grace and result.first_success is None:
        return False
    result.alive = False
    result.consecutive_failures += 1
    result.last_failure = when
    result.last_failure_cause = outcome.cause
    return True


def next_probe_in(
    check: HealthCheck, result: HealthResult, in_grace: bool, initial_seconds: float
) -> float:
    """Seconds until the next probe (pure). Fast probing must end with the grace
    period: past it failures count, and at the fast pace a task that never came up
    would be killed (and flood failed_health_check_event) within a second."""
    interval = float(check.interval_seconds)
    if result.first_success is None and in_grace:
        return min(interval, initial_seconds)
    return interval


OnChange = Callable[[Task, int, HealthResult], None]
OnFailure = Callable[[Task, int, HealthResult], None]
OnKill = Callable[[Task, str], None]


class TaskHealth:
    """Runs every health check of one task until stopped or the task must be killed."""

    def __init__(
        self,
        task: Task,
        checks: Sequence[HealthCheck],
        env: Mapping[str, str],
        probes: Probes,
        *,
        initial_probe_seconds: float,
        on_change: OnChange,
        on_failure: OnFailure,
        on_kill: OnKill,
    ) -> None:
        self.task = task
        self.checks = list(checks)
        self.env = env
        self._probes = probes
        self._initial = initial_probe_seconds
        self._on_change = on_change
        self._on_failure = on_failure
        self._on_kill = on_kill
        self._loops: list[asyncio.Task[None]] = []
        task.health_results = [HealthResult() for _ in self.checks]

    def __repr__(self) -> str:
        return f"<TaskHealth {self.task.id} checks={len(self.checks)} running={bool(self._loops)}>"

    def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._loop(i, check)) for i, check in enumerate(self.checks)
        ]

    async def stop(self) -> None:
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []

    def _port(self, check: HealthCheck) -> int | None:
        if check.port is not None:
            return check.port
        ports = self.task.ports
        return ports[check.port_index] if check.port_index < len(ports) else None

    async def _loop(self, index: int, check: HealthCheck) -> None:
        result = self.task.health_results[index]
        started = time.monotonic()
        port = self._port(check)
        while True:
            outcome = await self._probes.run(check, self.task.host, port, self.env)
            was_alive = result.alive
            in_grace = time.monotonic() - started < check.grace_period_seconds
            failed = record(result, outcome, in_grace, now_iso())
            if result.alive != was_alive:
                self._on_change(self.task, index, result)
            if failed:
                self._on_failure(self.task, index, result)
                limit = check.max_consecutive_failures
                if limit > 0 and result.consecutive_failures >= limit:
                    self._on_kill(
                        self.task,
                        f"{check.protocol} health check failed {result.consecutive_failures} "
                        f"times: {result.last_failure_cause}",
                    )
                    return
            await asyncio.sleep(next_probe_in(check, result, in_grace, self._initial))
