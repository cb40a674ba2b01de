"""One view of all gateway workers: worker 0's admin API asks every other worker
for a snapshot of its metrics and per-server health, and merges them.

The mechanism is a query over a unix socket per worker, made when ``/status`` or
``/metrics`` is asked for, rather than snapshot files each worker rewrites every
second:
- a scrape counts every request answered up to that moment, as it does with one
  worker, instead of lagging by up to a second;
- an idle gateway does no periodic work, and nothing is ever added to the request
  path (a snapshot is built from the counters the proxy already keeps);
- a worker that dies takes its socket with it, so its numbers cannot linger: no
  staleness rule and no pid check is needed.

The sockets live in Linux's abstract namespace (``--workers > 1`` needs Linux
anyway): no file is left behind by ``kill -9`` and no path length limit comes
from ``--data-dir``. The name carries the supervisor's pid and a random part,
and worker 0 checks the answering process's uid (SO_PEERCRED), so another local
user cannot feed it numbers.

A restarted worker starts its own counters from zero, as an nginx worker
does after a respawn; worker 0 carries what the dead one had counted up to
the last scrape (``Carry``), so the summed counters never go down.
``berth_gateway_worker_start_time_seconds{worker}`` shows when a worker started.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import secrets
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import psutil

from berth.gateway.cluster import ServerStatus
from berth.gateway.metrics import Metrics, as_int, as_num

if TYPE_CHECKING:
    from berth.gateway.discovery import Discovery

log = logging.getLogger("berth.gateway.workers")

# How long worker 0 waits for a peer's answer; a peer that is stuck (or busy
# starting) is shown as missing rather than holding the admin API up.
QUERY_TIMEOUT = 1.0
MAX_SNAPSHOT = 64 << 20
# How often a new worker retries to take over its index's socket name while its
# predecessor (rolling restart) still holds it; nothing announces the release.
REBIND_INTERVAL = 0.1

# "Worst" status across workers. Ejection comes from the store and is the same on
# every worker, so what a worker's own requests and checks found (unstable, err)
# says more; err is the worst: that worker sends the server nothing.
SEVERITY = {
    ServerStatus.OK: 0,
    ServerStatus.UNCHECKED: 1,
    ServerStatus.EJECTED: 2,
    ServerStatus.UNSTABLE: 3,
    ServerStatus.ERR: 4,
}

ServerKey = tuple[str, str]  # (cluster, address)


@dataclass(frozen=True, slots=True)
class WorkerGroup:
    """The workers of one supervisor: how many there are, and their sockets' names."""

    count: int
    name: str

    @classmethod
    def new(cls, count: int) -> WorkerGroup:
        return cls(count, f"berth-gateway-{os.getpid()}-{secrets.token_hex(8)}")

    def address(self, index: int) -> str:
        return f"\0{self.name}-{index}"


# -- snapshots (pure: state -> value -> JSON and back) ---------------------------------------


@dataclass(frozen=True, slots=True)
class ServerHealth:
    """One worker's view of one upstream server."""

    status: ServerStatus
    msg: str | None
    fail_num: int
    lastmodified: float
    active: int
    up: bool  # takes traffic on this worker now


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    worker: int
    pid: int
    started: float  # epoch: its counters count from then
    metrics: Metrics
    servers: Mapping[ServerKey, ServerHealth] = field(default_factory=dict)
    ready: bool = True  # its first view of the store is complete
    checks_done: int = 0
    last_check_time: float = 0.0
    checker_alive: bool = True
    store_up: bool = True

    def to_json(self) -> bytes:
        doc = {
            "worker": self.worker,
            "pid": self.pid,
            "started": self.started,
            "metrics": self.metrics.snapshot(),
            "servers": [
                [c, a, h.status.value, h.msg, h.fail_num, h.lastmodified, h.active, h.up]
                for (c, a), h in self.servers.items()
            ],
            "ready": self.ready,
            "checks_done": self.checks_done,
            "last_check_time": self.last_check_time,
            "checker_alive": self.checker_alive,
            "store_up": self.store_up,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> WorkerSnapshot:
        """ValueError naming the problem when ``raw`` is not a snapshot."""
        try:
            doc = json.loads(raw)
            servers: dict[ServerKey, ServerHealth] = {}
            for cluster, address, status, msg, fail_num, lastmodified, active, up in doc["servers"]:
                if not isinstance(cluster, str) or not isinstance(address, str):
                    raise TypeError("server keys must be strings")
                if msg is not None and not isinstance(msg, str):
                    raise TypeError("msg must be a string or null")
                servers[(cluster, address)] = ServerHealth(
                    ServerStatus(status),
                    msg,
                    as_int(fail_num),
                    as_num(lastmodified),
                    as_int(active),
                    _bool(up),
                )
            return cls(
                worker=as_int(doc["worker"]),
                pid=as_int(doc["pid"]),
                started=as_num(doc["started"]),
                metrics=Metrics.from_snapshot(doc["metrics"]),
                servers=servers,
                ready=_bool(doc["ready"]),
                checks_done=as_int(doc["checks_done"]),
                last_check_time=as_num(doc["last_check_time"]),
                checker_alive=_bool(doc["checker_alive"]),
                store_up=_bool(doc["store_up"]),
            )
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"not a worker snapshot: {exc}") from None


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {type(value).__name__}")
    return value


def snapshot_of(
    worker: int, started: float, discovery: Discovery, metrics: Metrics
) -> WorkerSnapshot:
    """This worker's state now (read only; the proxy's counters are not touched)."""
    mono, wall = time.monotonic(), time.time()
    servers: dict[ServerKey, ServerHealth] = {}
    for name, cluster in discovery.table.clusters.items():
        for s in cluster.servers:
            servers[(name, s.address)] = ServerHealth(
                s.status, s.msg, s.fail_num, s.lastmodified, s.active, s.available(mono, wall)
            )
    health = discovery.health
    return WorkerSnapshot(
        worker=worker,
        pid=os.getpid(),
        started=started,
        metrics=metrics,
        servers=servers,
        ready=discovery.ready.is_set(),
        checks_done=health.checks_done,
        last_check_time=health.last_check_time,
        checker_alive=health.alive,
        store_up=discovery.store_error is None,
    )


# -- merging (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MergedServer:
    """One server across workers: the worst status, with that worker's msg and fail_num."""

    status: ServerStatus
    msg: str | None
    fail_num: int
    lastmodified: float
    active: int  # summed
    up: bool  # takes traffic on every worker that knows it
    worker: int  # whose status, msg and fail_num are shown
    by_worker: Mapping[int, ServerStatus]


def merge_server(views: Mapping[int, ServerHealth]) -> MergedServer:
    """Needs at least one view. Ties on status go to more failures, then the latest
    change, then the lowest worker index."""
    worst = max(
        views,
        key=lambda i: (
            SEVERITY[views[i].status],
            views[i].fail_num,
            views[i].lastmodified,
            -i,
        ),
    )
    w = views[worst]
    return MergedServer(
        status=w.status,
        msg=w.msg,
        fail_num=w.fail_num,
        lastmodified=w.lastmodified,
        active=sum(v.active for v in views.values()),
        up=all(v.up for v in views.values()),
        worker=worst,
        by_worker={i: views[i].status for i in sorted(views)},
    )


@dataclass(frozen=True, slots=True)
class WorkersView:
    """Every reporting worker merged: what worker 0's admin API shows."""

    configured: int
    snapshots: tuple[WorkerSnapshot, ...]  # the reporting workers, by index
    metrics: Metrics
    servers: Mapping[ServerKey, MergedServer]

    def __repr__(self) -> str:
        return (
            f"<WorkersView reporting={[s.worker for s in self.snapshots]} "
            f"configured={self.configured} servers={len(self.servers)}>"
        )

    @property
    def missing(self) -> list[int]:
        seen = {s.worker for s in self.snapshots}
        return [i for i in range(self.configured) if i not in seen]

    @property
    def checks_done(self) -> int:
        return sum(s.checks_done for s in self.snapshots)

    @property
    def last_check_time(self) -> float:
        return max((s.last_check_time for s in self.snapshots), default=0.0)

    @property
    def checker_alive(self) -> bool:
        return all(s.checker_alive for s in self.snapshots)

    @property
    def store_up(self) -> bool:
        return all(s.store_up for s in self.snapshots)


def merge(
    configured: int, snapshots: Sequence[WorkerSnapshot], carried: Sequence[Metrics] = ()
) -> WorkersView:
    """Sum the metrics, merge each server's health; one snapshot per worker index
    (the first given wins if an index repeats). ``carried``: counters of workers
    that are gone or silent (see ``Carry``), added so totals never go down."""
    by_index: dict[int, WorkerSnapshot] = {}
    for snap in snapshots:
        by_index.setdefault(snap.worker, snap)
    ordered = tuple(by_index[i] for i in sorted(by_index))
    views: dict[ServerKey, dict[int, ServerHealth]] = {}
    for snap in ordered:
        for key, health in snap.servers.items():
            views.setdefault(key, {})[snap.worker] = health
    return WorkersView(
        configured=configured,
        snapshots=ordered,
        metrics=Metrics.merged([*(s.metrics for s in ordered), *carried]),
        servers={key: merge_server(v) for key, v in views.items()},
    )


class Carry:
    """Keeps the summed counters from going down when a worker other than 0 dies.

    Prometheus reads any drop of a counter as a reset and counts the whole new
    value as an increase, so the sum losing a dead worker's share showed as a
    burst of traffic. Worker 0 remembers each peer's last snapshot: when another
    process answers for that index, or the peer is silent and its process is
    gone, its counters move to ``retired`` for good; while a live peer is
    silent (stuck, busy), its last counters stand in for it. Only what the dead
    worker counted after the last scrape is lost. Gauges are not carried.
    Worker 0 itself cannot carry its own numbers over its own death: a new
    worker 0 (or a rolling restart) starts every total from zero, which
    ``berth_gateway_worker_start_time_seconds`` shows."""

    def __init__(self, alive: Callable[[int], bool]) -> None:
        self._alive = alive
        self._last: dict[int, WorkerSnapshot] = {}
        self.retired = Metrics()

    def __repr__(self) -> str:
        return f"<Carry peers={sorted(self._last)} retired={self.retired.requests_total()}>"

    def update(self, answered: Mapping[int, WorkerSnapshot], peers: Iterable[int]) -> list[Metrics]:
        """Record this scrape's answers; the counters to add to the live ones."""
        stale: list[Metrics] = []
        for index in peers:
            new, old = answered.get(index), self._last.get(index)
            if new is not None:
                if old is not None and (old.pid, old.started) != (new.pid, new.started):
                    self._retire(old)
                self._last[index] = new
            elif old is not None:
                if self._alive(old.pid):
                    stale.append(_counters(old.metrics))
                else:
                    self._retire(old)
                    del self._last[index]
        return [self.retired, *stale]

    def _retire(self, snap: WorkerSnapshot) -> None:
        self.retired = Metrics.merged([self.retired, _counters(snap.metrics)])


def _counters(metrics: Metrics) -> Metrics:
    """The counters only: a gone worker has no open connections."""
    out = Metrics.merged([metrics])
    out.connections_active = 0
    return out


# -- the sockets ---------------------------------------------------------------------------------


class _Answer(asyncio.Protocol):
    def __init__(self, snapshot: Callable[[], bytes]) -> None:
        self._snapshot = snapshot

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.WriteTransport subclasses: no isinstance.
        writer = cast(asyncio.WriteTransport, transport)
        try:
            writer.write(self._snapshot())
        except Exception:  # a bug here must not take the worker down
            log.exception("building the worker snapshot failed")
        transport.close()


class AnswerState(enum.Enum):
    NEW = "new"
    WAITING = "waiting"  # the predecessor with this index still holds the name
    LISTENING = "listening"
    CLOSED = "closed"


class SnapshotServer:
    """A worker's end: every connection gets one JSON snapshot, then EOF."""

    def __init__(self, group: WorkerGroup, index: int, snapshot: Callable[[], bytes]) -> None:
        self.address = group.address(index)
        self.index = index
        self.state = AnswerState.NEW
        self._snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None
        self._binding: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<SnapshotServer worker={self.index} {self.state.value}>"

    def _try_bind(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.address)
        except OSError:
            sock.close()
            return None
        sock.listen(64)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        sock = self._try_bind()
        if sock is None:
            log.info("worker %d: predecessor still answers for this index; waiting", self.index)
            self.state = AnswerState.WAITING
            self._binding = asyncio.create_task(self._bind_later(), name="snapshot-bind")
            return
        await self._listen(sock)

    async def _listen(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Answer(self._snapshot), sock=sock)
        self.state = AnswerState.LISTENING

    async def _bind_later(self) -> None:
        while (sock := self._try_bind()) is None:  # noqa: ASYNC110 (no event for the release)
            await asyncio.sleep(REBIND_INTERVAL)
        await self._listen(sock)

    async def stop(self) -> None:
        """Let go of the name first thing, so a successor can take it over."""
        if self._binding is not None:
            self._binding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._binding
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.state = AnswerState.CLOSED


_CRED = struct.Struct("3i")


async def query_peer(
    address: str, timeout: float = QUERY_TIMEOUT, index: int | None = None
) -> WorkerSnapshot | None:
    """Ask one worker for its snapshot; None when it does not answer (dead,
    restarting, stuck) or answers something that is not a snapshot."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, address)
            _, uid, _ = _CRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
            )
            if uid != os.geteuid():
                log.warning("worker socket %r is held by uid %d; ignored", address[1:], uid)
                return None
            chunks: list[bytes] = []
            size = 0
            while chunk := await loop.sock_recv(sock, 1 << 16):
                size += len(chunk)
                if size > MAX_SNAPSHOT:
                    log.warning("worker snapshot over %d bytes; ignored", MAX_SNAPSHOT)
                    return None
                chunks.append(chunk)
    except (OSError, TimeoutError) as exc:
        # Refused or missing: the worker is dead or not yet started; that is its
        # absence from the view, not an error of the view.
        log.debug("worker socket %r: %s", address[1:], exc)
        return None
    finally:
        sock.close()
    try:
        snap = WorkerSnapshot.from_json(b"".join(chunks))
    except ValueError as exc:
        log.warning("worker socket %r: %s", address[1:], exc)
        return None
    if index is not None and snap.worker != index:
        log.warning("worker socket %r answered as worker %d; ignored", address[1:], snap.worker)
        return None
    return snap


class PeerCollector:
    """Worker 0's end: its own snapshot plus every peer's, merged."""

    def __init__(
        self,
        group: WorkerGroup,
        local: Callable[[], WorkerSnapshot],
        timeout: float = QUERY_TIMEOUT,
        alive: Callable[[int], bool] = psutil.pid_exists,
    ) -> None:
        self.group = group
        self._local = local
        self._timeout = timeout
        self.carry = Carry(alive)

    def __repr__(self) -> str:
        return f"<PeerCollector workers={self.group.count}>"

    async def view(self) -> WorkersView:
        peers = await asyncio.gather(
            *(
                query_peer(self.group.address(i), self._timeout, i)
                for i in range(1, self.group.count)
            )
        )
        answered = {p.worker: p for p in peers if p is not None}
        carried = self.carry.update(answered, range(1, self.group.count))
        return merge(self.group.count, [self._local(), *answered.values()], carried)
