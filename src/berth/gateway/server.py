"""Gateway processes: one worker's server, and the supervisor of N workers.

Workers share one listening socket bound by the supervisor before it forks
(with SO_REUSEPORT set so another gateway process can bind the port too).
A shared socket rather than one socket per worker: when a worker stops, the
connections waiting in the accept queue stay there for the other workers,
whereas closing a per-worker SO_REUSEPORT socket resets its queued
connections. That is what lets a rolling restart (SIGHUP) lose no request.

Each worker keeps its own counters and passive health state; worker 0's admin
API asks the others for theirs and shows them merged (workers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING

from berth.gateway.compiled import is_compiled
from berth.gateway.config import GatewayConfig
from berth.gateway.proxy import ClientProtocol, ProxyContext, TableSource
from berth.gateway.upstream import UpstreamPool
from berth.gateway.workers import (
    PeerCollector,
    SnapshotServer,
    WorkerGroup,
    WorkerSnapshot,
    snapshot_of,
)
from berth.listen import bind

if TYPE_CHECKING:
    import uvicorn

    from berth.gateway.accesslog import AccessLog
    from berth.gateway.discovery import Discovery
    from berth.store.client import StoreClient

log = logging.getLogger("berth.gateway")

BACKLOG = 4096
# How long idle keep-alive connections stay open once draining starts.
IDLE_DRAIN = 1.0
# How long request tasks get to finish once their connections are aborted.
TASK_GRACE = 1.0


class ServerState(enum.Enum):
    NEW = "new"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"


class GatewayServer:
    """One worker: the proxy on the data socket, plus the admin API on worker 0."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        sock: socket.socket | None = None,
        admin_sock: socket.socket | None = None,
        routes: TableSource | None = None,
        worker: int = 0,
        group: WorkerGroup | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        # The supervisor's workers, when there are several: worker 0 shows them all.
        self.group = group
        self.started = time.time()
        self._answers: SnapshotServer | None = None
        self.state = ServerState.NEW
        self._sock = sock
        self._admin_sock = admin_sock
        self._routes = routes
        self.store: StoreClient | None = None
        self.discovery: Discovery | None = None
        self.access_log: AccessLog | None = None
        self.ctx: ProxyContext | None = None
        self._server: asyncio.AbstractServer | None = None
        self._admin: uvicorn.Server | None = None
        self._admin_task: asyncio.Task[None] | None = None
        self._exit = asyncio.Event()
        self._drained = asyncio.Event()
        self.port = 0
        self.admin_port = 0

    def __repr__(self) -> str:
        conns = len(self.ctx.connections) if self.ctx else 0
        return (
            f"<GatewayServer worker={self.worker} {self.state.value} port={self.port} "
            f"connections={conns}>"
        )

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        routes = self._routes
        if routes is None:
            from berth.gateway.discovery import Discovery
            from berth.store.client import StoreClient

            self.store = StoreClient(cfg.store_url, cfg.token)
            self.discovery = Discovery(self.store, cfg)
            await self.discovery.start()
            routes = self.discovery
        if cfg.access_log:
            from berth.gateway.accesslog import AccessLog

            self.access_log = AccessLog(
                cfg.log_dir / "access.log",
                max_bytes=cfg.access_log_max_bytes,
                backups=cfg.access_log_backups,
                max_pending=cfg.access_log_buffer,
            )
            await self.access_log.start()
        pool = UpstreamPool(max_idle=cfg.upstream_keepalive, idle_timeout=cfg.upstream_idle_timeout)
        self.ctx = ctx = ProxyContext(cfg, routes, pool, access_log=self.access_log)
        ctx.on_idle = self._on_idle
        sock = self._sock or bind(cfg.host, cfg.port, reuse_port=True, backlog=BACKLOG)
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientProtocol(ctx), sock=sock, backlog=BACKLOG
        )
        self.state = ServerState.SERVING
        build = "compiled" if is_compiled() else "interpreted, see README"
        log.info("worker %d listening on %s (data plane %s)", self.worker, self.url, build)
        if self.group is not None and self.worker != 0 and self.discovery is not None:
            self._answers = SnapshotServer(
                self.group, self.worker, lambda: self.snapshot().to_json()
            )
            await self._answers.start()
        if self.worker == 0 and self.discovery is not None and self.store is not None:
            await self._start_admin()

    def snapshot(self) -> WorkerSnapshot:
        assert self.discovery is not None and self.ctx is not None
        return snapshot_of(self.worker, self.started, self.discovery, self.ctx.metrics)

    async def _start_admin(self) -> None:
        import uvicorn

        from berth.gateway.admin import create_admin_app

        assert self.discovery is not None and self.store is not None
        cfg = self.config
        sock = self._admin_sock or bind(cfg.admin_host, cfg.admin_port, backlog=BACKLOG)
        self.admin_port = sock.getsockname()[1]
        peers = None
        if self.group is not None and self.group.count > 1:
            peers = PeerCollector(self.group, self.snapshot)
        app = create_admin_app(self.discovery, cfg, self.store, peers)
        self._admin = uvicorn.Server(
            uvicorn.Config(
                app, lifespan="off", loop="none", access_log=False, log_config=None, http="h11"
            )
        )
        # startup/main_loop/shutdown rather than serve(): serve() would take over
        # SIGTERM, and the gateway drains in its own order.
        config = self._admin.config
        config.load()
        self._admin.lifespan = config.lifespan_class(config)
        await self._admin.startup(sockets=[sock])
        self._admin_task = asyncio.create_task(self._admin.main_loop(), name="admin")
        log.info("admin API on http://%s:%d", cfg.admin_host, self.admin_port)

    def _on_idle(self) -> None:
        if self.state is ServerState.DRAINING:
            self._drained.set()

    async def _wait_drained(self, timeout: float) -> None:
        if self.ctx is not None and self.ctx.connections and timeout > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout)

    def request_exit(self) -> None:
        self._exit.set()

    async def wait_stopped(self) -> None:
        await self._exit.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, close."""
        if self.state in (ServerState.DRAINING, ServerState.STOPPED):
            return
        self.state = ServerState.DRAINING
        if self._answers is not None:
            # First, so that a successor with this index (rolling restart) can
            # answer for it while this one drains.
            await self._answers.stop()
        ctx = self.ctx
        if self._server is not None:
            self._server.close()
        if ctx is not None:
            ctx.draining = True
            for conn in list(ctx.connections):
                conn.shutdown()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.shutdown_grace
            # Idle keep-alive connections first get a moment to carry one more
            # request (answered with Connection: close), so a request already on
            # the wire is served instead of meeting a closed connection.
            await self._wait_drained(min(IDLE_DRAIN, self.config.shutdown_grace))
            for conn in list(ctx.connections):
                conn.close_if_idle()
            await self._wait_drained(deadline - loop.time())
            left = list(ctx.connections)
            if left:
                log.warning("grace period over: aborting %d connections", len(left))
                for conn in left:
                    conn.abort()
            # Aborted exchanges settle as "client gone" and their tasks log them
            # (499) on the next turns of the loop: wait for that, briefly.
            if ctx.tasks:
                _, pending = await asyncio.wait(ctx.tasks, timeout=TASK_GRACE)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
            ctx.pool.close()
        if self._admin is not None:
            self._admin.should_exit = True
            if self._admin_task is not None:
                await self._admin_task
            await self._admin.shutdown()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.access_log is not None:
            await self.access_log.stop()
        if self.store is not None:
            await self.store.close()
        self.state = ServerState.STOPPED
        log.info("worker %d stopped", self.worker)


# -- processes ------------------------------------------------------------------------


async def serve_worker(
    config: GatewayConfig,
    *,
    sock: socket.socket | None = None,
    admin_sock: socket.socket | None = None,
    worker: int = 0,
    group: WorkerGroup | None = None,
    ready_fd: int | None = None,
) -> None:
    from berth.cli.runtime import run_until_signal

    server = GatewayServer(config, sock=sock, admin_sock=admin_sock, worker=worker, group=group)
    await server.start()
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    await run_until_signal(server.request_exit, server.wait_stopped)


_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


class Supervisor:
    """Forks N workers sharing the sockets; restarts crashed ones; SIGHUP restarts
    them one at a time (each new worker is listening before its predecessor drains);
    SIGTERM/SIGINT drains them all."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.sock = bind(config.host, config.port, reuse_port=True, backlog=BACKLOG)
        self.admin_sock = bind(config.admin_host, config.admin_port, backlog=BACKLOG)
        self.group = WorkerGroup.new(config.workers)
        self.workers: dict[int, int] = {}  # pid -> worker index
        self.stopping = False

    def __repr__(self) -> str:
        return f"<Supervisor workers={sorted(self.workers.values())} stopping={self.stopping}>"

    def spawn(self, index: int) -> int:
        """Fork worker ``index``; returns its pid once it is accepting connections."""
        from berth.cli.runtime import run

        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(rfd)
            # SIGHUP means "restart the workers" to the supervisor; a HUP sent
            # to the whole process group must not kill them.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
            code = 0
            try:
                run(
                    serve_worker(
                        self.config,
                        sock=self.sock,
                        admin_sock=self.admin_sock if index == 0 else None,
                        worker=index,
                        group=self.group,
                        ready_fd=wfd,
                    )
                )
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(wfd)
        self.workers[pid] = index
        # Wait until it listens (or dies: EOF on the pipe without a byte).
        ready, _, _ = select.select([rfd], [], [], 60)
        ok = bool(ready) and os.read(rfd, 1) == b"1"
        os.close(rfd)
        if not ok:
            log.error("worker %d (pid %d) did not start", index, pid)
        return pid

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        host, port = self.sock.getsockname()[:2]
        log.info("gateway supervisor: %d workers on %s:%d", self.config.workers, host, port)
        for index in range(self.config.workers):
            self.spawn(index)
        while self.workers:
            info = signal.sigwaitinfo(_SIGNALS)
            if info.si_signo == signal.SIGCHLD:
                self._reap()
            elif info.si_signo == signal.SIGHUP and not self.stopping:
                self._rolling_restart()
            elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self.stopping = True
                for pid in list(self.workers):
                    _kill(pid, signal.SIGTERM)
        log.info("gateway stopped")
        return 0

    def _reap(self) -> int | None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                return None
            if pid == 0:
                return None
            index = self.workers.pop(pid, None)
            if index is None:
                continue
            if not self.stopping:
                code = os.waitstatus_to_exitcode(status)
                log.error("worker %d (pid %d) exited with %d; restarting it", index, pid, code)
                self.spawn(index)
        return None

    def _rolling_restart(self) -> None:
        log.info("rolling restart of %d workers", len(self.workers))
        for old_pid, index in sorted(self.workers.items(), key=lambda kv: kv[1]):
            self.spawn(index)
            _kill(old_pid, signal.SIGTERM)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(old_pid, 0)
            self.workers.pop(old_pid, None)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def run_gateway(config: GatewayConfig) -> int:
    """``berth gateway``: one worker in this process, or a supervisor of N forked workers."""
    from berth.cli.runtime import run

    if config.workers == 1:
        run(serve_worker(config))
        return 0
    if sys.platform != "linux":  # pragma: no cover
        raise SystemExit("--workers > 1 needs Linux (fork + SO_REUSEPORT)")
    return Supervisor(config).run()
