"""Active health checks: one asyncio task per cluster, TCP connect or an HTTP GET.

Unlike checkups (worker 0 only, servers of an upstream one after another),
every worker checks its own view and the servers of a cluster are checked
concurrently, bounded by one semaphore for the whole gateway so a thousand
servers cannot open a thousand sockets at once. A server that appears in a
new routing table is checked at once, not at the next interval (the complaint
of lua-resty-upstream-healthcheck#55).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from berth.gateway.cluster import CheckSpec, Cluster, Server, ServerStatus
from berth.gateway.routes import RoutingTable

log = logging.getLogger("berth.gateway.health")

# How much of an HTTP check reply we read: the status line is all that counts.
_MAX_STATUS_LINE = 4096


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    msg: str | None = None


def _describe(exc: BaseException) -> str:
    """Short error text in the words operators know from nginx and checkups."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, OSError):
        if exc.errno == errno.EHOSTUNREACH:
            return "no route to host"
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


async def check_tcp(host: str, port: int, timeout: float) -> CheckResult:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        return CheckResult(False, _describe(exc))
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return CheckResult(True)


def http_check_request(spec: CheckSpec, server: Server) -> bytes:
    host = spec.host or server.address
    return (
        f"GET {spec.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: berth-health-check\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")


def parse_status_line(line: bytes) -> int | None:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return None
    code = int(parts[1])
    return code if 100 <= code <= 599 else None


async def check_http(server: Server, spec: CheckSpec) -> CheckResult:
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(spec.timeout):
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(http_check_request(spec, server))
            await writer.drain()
            line = await reader.readuntil(b"\n")
    except (OSError, TimeoutError) as exc:
        return CheckResult(False, _describe(exc))
    except asyncio.IncompleteReadError:
        return CheckResult(False, "connection closed before the status line")
    except asyncio.LimitOverrunError:
        return CheckResult(False, "status line too long")
    finally:
        if writer is not None:
            writer.close()
    code = parse_status_line(line[:_MAX_STATUS_LINE])
    if code is None:
        return CheckResult(False, "bad status line")
    if code not in spec.statuses:
        return CheckResult(False, f"bad status {code}")
    return CheckResult(True)


async def run_check(server: Server, spec: CheckSpec) -> CheckResult:
    if spec.type == "http":
        return await check_http(server, spec)
    return await check_tcp(server.host, server.port, spec.timeout)


@dataclass(slots=True, eq=False)
class _ClusterChecks:
    cluster: Cluster
    task: asyncio.Task[None] | None = None
    known: set[tuple[str, int]] = field(default_factory=set)
    last_round: float = 0.0


class HealthChecker:
    """Keeps one check loop per cluster in step with the current routing table."""

    def __init__(
        self, max_concurrency: int = 64, on_change: Callable[[], None] | None = None
    ) -> None:
        self._sem = asyncio.Semaphore(max_concurrency)
        # Called after a server's status changed (discovery wakes its waiters).
        self._on_change = on_change
        self._clusters: dict[str, _ClusterChecks] = {}
        self._oneshots: set[asyncio.Task[None]] = set()
        self._stopped = False
        self.last_check_time = 0.0  # epoch of the latest finished check, for /status
        self.checks_done = 0

    def __repr__(self) -> str:
        running = sum(1 for c in self._clusters.values() if c.task and not c.task.done())
        return (
            f"<HealthChecker clusters={len(self._clusters)} running={running} "
            f"checks_done={self.checks_done}>"
        )

    @property
    def alive(self) -> bool:
        return not self._stopped and all(
            c.task is None or not c.task.done() for c in self._clusters.values()
        )

    def update(self, table: RoutingTable) -> None:
        """Follow a table swap: start, restart or stop loops; check new servers now."""
        if self._stopped:
            return
        for name in list(self._clusters):
            if name not in table.clusters:
                self._cancel(self._clusters.pop(name))
        for name, cluster in table.clusters.items():
            state = self._clusters.get(name)
            enabled = cluster.check.type != "none" and bool(cluster.servers)
            keys = {(s.host, s.port) for s in cluster.servers}
            if state is None:
                state = self._clusters[name] = _ClusterChecks(cluster)
                if enabled:
                    state.task = self._start(state)
                state.known = keys
                continue
            old_spec = state.cluster.check
            state.cluster = cluster
            if not enabled:
                if state.task is not None:
                    self._cancel(state)
                    state.task = None
                if old_spec.type != "none":
                    # Checks turned off: nobody would ever restore an ERR server.
                    for s in cluster.servers:
                        s.reset_checks()
            elif state.task is None or state.task.done() or old_spec != cluster.check:
                self._cancel(state)
                state.task = self._start(state)  # the loop checks every server first
            else:
                new = [s for s in cluster.servers if (s.host, s.port) not in state.known]
                for server in new:
                    self._oneshot(cluster, server)
            state.known = keys

    def _start(self, state: _ClusterChecks) -> asyncio.Task[None]:
        return asyncio.create_task(self._loop(state), name=f"health:{state.cluster.name}")

    def _cancel(self, state: _ClusterChecks) -> None:
        if state.task is not None and not state.task.done():
            state.task.cancel()

    def _oneshot(self, cluster: Cluster, server: Server) -> None:
        task = asyncio.create_task(self._check_one(cluster, server))
        self._oneshots.add(task)
        task.add_done_callback(self._oneshots.discard)

    async def _loop(self, state: _ClusterChecks) -> None:
        while True:
            cluster = state.cluster
            await asyncio.gather(*(self._check_one(cluster, s) for s in cluster.servers))
            state.last_round = time.time()
            if cluster.protected and cluster.servers and not cluster.has_available():
                # checkups shows one server "unstable" when all fail: it still gets traffic.
                cluster.least_bad()
                if self._on_change is not None:
                    self._on_change()
            await asyncio.sleep(state.cluster.check.interval)

    async def _check_one(self, cluster: Cluster, server: Server) -> None:
        spec = cluster.check
        async with self._sem:
            try:
                result = await run_check(server, spec)
            except Exception as exc:  # a checker bug must not kill the loop
                log.exception("health check of %s failed unexpectedly", server.address)
                result = CheckResult(False, _describe(exc))
        self.checks_done += 1
        self.last_check_time = time.time()
        was = server.status
        if server.record_check(result.ok, result.msg, rise=spec.rise, fall=spec.fall):
            if self._on_change is not None:
                self._on_change()
            level = logging.INFO if server.health is ServerStatus.OK else logging.WARNING
            log.log(
                level,
                "upstream %s server %s: %s -> %s%s",
                cluster.name,
                server.address,
                was.value,
                server.status.value,
                f" ({result.msg})" if result.msg else "",
            )

    async def stop(self) -> None:
        self._stopped = True
        tasks = [c.task for c in self._clusters.values() if c.task is not None]
        tasks += list(self._oneshots)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._clusters.clear()
