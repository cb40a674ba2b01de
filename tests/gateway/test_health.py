from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable

import pytest

from berth.gateway.cluster import CheckSpec, Cluster, Server, ServerStatus
from berth.gateway.health import (
    HealthChecker,
    check_http,
    check_tcp,
    parse_status_line,
)
from berth.gateway.routes import RoutingTable


class TinyHTTP:
    """A real HTTP/1.1 server on 127.0.0.1 whose status can be changed by the test."""

    def __init__(self, status: int = 200, *, silent: bool = False) -> None:
        self.status = status
        self.silent = silent
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, port: int = 0) -> TinyHTTP:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests.append(head)
            if self.silent:
                await reader.read()  # hold the connection until the client gives up
            else:
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % self.status)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


@pytest.fixture
async def http() -> AsyncIterator[TinyHTTP]:
    srv = await TinyHTTP().start()
    yield srv
    await srv.stop()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Changes:
    """The checker's on_change hook as an awaitable: tests wait for status changes."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.event.set()

    async def until(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                await self.event.wait()
                self.event.clear()


def test_parse_status_line() -> None:
    assert parse_status_line(b"HTTP/1.1 204 No Content\r\n") == 204
    assert parse_status_line(b"HTTP/1.0 503\r\n") == 503
    assert parse_status_line(b"SSH-2.0-OpenSSH\r\n") is None
    assert parse_status_line(b"HTTP/1.1 99999 x") is None
    assert parse_status_line(b"") is None


async def test_tcp_check(http: TinyHTTP) -> None:
    assert (await check_tcp("127.0.0.1", http.port, 2.0)).ok
    result = await check_tcp("127.0.0.1", closed_port(), 2.0)
    assert not result.ok and result.msg == "connection refused"


async def test_http_check_statuses(http: TinyHTTP) -> None:
    server = Server("127.0.0.1", http.port)
    spec = CheckSpec(type="http", path="/healthz", host="svc.internal")
    assert (await check_http(server, spec)).ok
    assert http.requests[-1].startswith(b"GET /healthz HTTP/1.1\r\nHost: svc.internal\r\n")
    http.status = 500
    result = await check_http(server, spec)
    assert not result.ok and result.msg == "bad status 500"
    http.status = 503
    assert (await check_http(server, CheckSpec(type="http", statuses=frozenset({503})))).ok


async def test_http_check_timeout_and_garbage() -> None:
    silent = await TinyHTTP(silent=True).start()
    try:
        result = await check_http(Server("127.0.0.1", silent.port), CheckSpec(timeout=0.2))
        assert not result.ok and result.msg == "timeout"
    finally:
        await silent.stop()

    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 smtp ready\r\n")
        await w.drain()
        w.close()

    srv = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        port = srv.sockets[0].getsockname()[1]
        result = await check_http(Server("127.0.0.1", port), CheckSpec(type="http"))
        assert not result.ok and result.msg == "bad status line"
    finally:
        srv.close()
        await srv.wait_closed()


async def test_checker_marks_down_and_restores_without_restart() -> None:
    port = closed_port()
    server = Server("127.0.0.1", port)
    spec = CheckSpec(type="http", path="/", interval=0.05, timeout=1.0, rise=2, fall=2)
    cluster = Cluster("svc", [server], check=spec)
    changes = Changes()
    checker = HealthChecker(on_change=changes)
    checker.update(RoutingTable((), {"svc": cluster}))
    try:
        await changes.until(lambda: server.status is not ServerStatus.UNCHECKED)
        # The only server is down: protect mode shows it unstable, as checkups does.
        await changes.until(lambda: server.status is ServerStatus.UNSTABLE)
        assert server.health is ServerStatus.ERR and server.msg == "connection refused"
        up = await TinyHTTP().start(port)
        try:
            await changes.until(lambda: server.status is ServerStatus.OK)
            assert server.msg is None and server.fail_num == 0
        finally:
            await up.stop()
        assert "HealthChecker clusters=1 running=1" in repr(checker)
        assert checker.alive
    finally:
        await checker.stop()
    assert not checker.alive


async def test_passive_err_is_restored_by_active_check(http: TinyHTTP) -> None:
    server = Server("127.0.0.1", http.port, max_fails=1, fail_timeout=1e6)
    cluster = Cluster("svc", [server], check=CheckSpec(interval=0.05, rise=1))
    changes = Changes()
    checker = HealthChecker(on_change=changes)
    checker.update(RoutingTable((), {"svc": cluster}))
    try:
        await changes.until(lambda: server.status is ServerStatus.OK)
        cluster.on_request_start(server)
        cluster.on_request_end(server, False, "upstream timed out")
        assert server.health is ServerStatus.ERR
        await changes.until(lambda: server.health is ServerStatus.OK)
    finally:
        await checker.stop()


async def test_new_server_is_checked_at_once(http: TinyHTTP) -> None:
    old = Server("127.0.0.1", http.port)
    # An interval far longer than the test: only the immediate check can run.
    spec = CheckSpec(interval=3600, rise=5)
    changes = Changes()
    checker = HealthChecker(on_change=changes)
    checker.update(RoutingTable((), {"svc": Cluster("svc", [old], check=spec)}))
    try:
        await changes.until(lambda: old.status is ServerStatus.OK)
        dead = Server("127.0.0.1", closed_port())
        fresh = Server("localhost", http.port)
        checker.update(RoutingTable((), {"svc": Cluster("svc", [old, dead, fresh], check=spec)}))
        await changes.until(lambda: fresh.status is ServerStatus.OK)
        await changes.until(lambda: dead.status is ServerStatus.ERR)
        assert old.status is ServerStatus.OK
    finally:
        await checker.stop()


async def test_turning_checks_off_makes_servers_usable_again() -> None:
    server = Server("127.0.0.1", closed_port())
    changes = Changes()
    checker = HealthChecker(on_change=changes)
    checker.update(
        RoutingTable((), {"svc": Cluster("svc", [server], check=CheckSpec(interval=0.05))})
    )
    try:
        await changes.until(lambda: server.health is ServerStatus.ERR)
        off = Cluster("svc", [server], check=CheckSpec(type="none"))
        checker.update(RoutingTable((), {"svc": off}))
        assert server.status is ServerStatus.UNCHECKED
        assert server.available(time.monotonic(), time.time())
        # A removed cluster's loop stops.
        checker.update(RoutingTable((), {}))
        assert repr(checker).startswith("<HealthChecker clusters=0 running=0")
    finally:
        await checker.stop()
