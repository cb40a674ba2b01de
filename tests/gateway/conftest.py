"""Shared fixtures for gateway tests: real upstream servers and an in-process gateway.

Upstreams are uvicorn servers running a tiny ASGI app on 127.0.0.1:0 in the
test's own loop; ``RawUpstream`` is a bare asyncio server for the misbehaving
cases (closing mid-response, garbage) no well-behaved server produces.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import uvloop

from berth.gateway.cluster import Cluster, Server
from berth.gateway.config import GatewayConfig
from berth.gateway.routes import Route, RoutingTable
from berth.gateway.server import GatewayServer
from berth.listen import bind

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class EchoApp:
    """Paths: /status/<n>, /sleep/<s>, /bytes/<n> (streamed), /chunks/<n>, /echo
    (streams the body back), anything else: JSON describing the request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.hold = asyncio.Event()
        self.arrived = asyncio.Event()  # set when a request arrives (tests clear it)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        record = {"method": scope["method"], "path": path, "query": scope["query_string"].decode()}
        record["headers"] = headers
        self.requests.append(record)
        self.arrived.set()
        base = [(b"x-upstream", self.name.encode()), (b"content-type", b"application/json")]
        if path == "/echo":
            await send({"type": "http.response.start", "status": 200, "headers": base})
            while True:
                msg = await receive()
                await send(
                    {"type": "http.response.body", "body": msg.get("body", b""), "more_body": True}
                )
                if not msg.get("more_body"):
                    break
            await send({"type": "http.response.body", "body": b""})
            return
        digest = hashlib.sha256()
        size = 0
        while True:
            msg = await receive()
            body = msg.get("body", b"")
            digest.update(body)
            size += len(body)
            if not msg.get("more_body"):
                break
        record["body_size"] = size
        record["body_sha256"] = digest.hexdigest()
        status = 200
        parts = path.strip("/").split("/")
        if parts[0] == "status" and len(parts) > 1:
            status = int(parts[1])
        elif parts[0] == "sleep" and len(parts) > 1:
            await asyncio.sleep(float(parts[1]))
        elif parts[0] == "hold":
            await self.hold.wait()
        elif parts[0] == "bytes" and len(parts) > 1:
            total = int(parts[1])
            head = [*base, (b"content-length", str(total).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            block = b"x" * 65536
            while total > 0:
                n = min(total, len(block))
                total -= n
                await send({"type": "http.response.body", "body": block[:n], "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        elif parts[0] == "chunks" and len(parts) > 1:
            await send({"type": "http.response.start", "status": 200, "headers": base})
            for i in range(int(parts[1])):
                body = f"chunk-{i};".encode()
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        payload = json.dumps({"upstream": self.name, **record}).encode()
        head = [*base, (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": payload})

    async def _websocket(self, receive: Receive, send: Send) -> None:
        msg = await receive()
        assert msg["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        while True:
            msg = await receive()
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is not None:
                await send({"type": "websocket.send", "text": f"{self.name}:{text}"})
            else:
                await send({"type": "websocket.send", "bytes": msg.get("bytes") or b""})


@dataclass
class Upstream:
    name: str
    app: EchoApp
    server: uvicorn.Server
    port: int
    task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        self.app.hold.set()
        if self.task is not None:
            await self.task
            await self.server.shutdown()
            self.task = None


async def start_upstream(name: str) -> Upstream:
    sock = bind("127.0.0.1", 0, backlog=512)
    app = EchoApp(name)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="off",
            loop="none",
            http="httptools",
            ws="websockets-sansio",
            access_log=False,
            log_config=None,
            timeout_keep_alive=30,
        )
    )
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await server.startup(sockets=[sock])
    up = Upstream(name, app, server, sock.getsockname()[1])
    up.task = asyncio.create_task(server.main_loop())
    return up


class RawUpstream:
    """A bare TCP server: ``handler(reader, writer)`` decides what the 'upstream' does."""

    def __init__(
        self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> RawUpstream:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                self._tasks.discard(task)
                writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            await self.server.wait_closed()


@dataclass
class StaticRoutes:
    """A fixed routing table (discovery's place in tests of the data path)."""

    table: RoutingTable = field(default_factory=RoutingTable)

    def set(self, routes: list[Route], clusters: dict[str, list[tuple[str, int]]]) -> None:
        built = {
            name: Cluster(name, [Server(h, p, max_fails=0) for h, p in servers])
            for name, servers in clusters.items()
        }
        self.table = RoutingTable(routes, built)


def gateway_config(tmp_path: Path, **overrides: Any) -> GatewayConfig:
    doc: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": 0,
        "data_dir": tmp_path,
        "shutdown_grace": 2.0,
    }
    doc.update(overrides)
    return GatewayConfig(**doc)


@dataclass
class Gateway:
    server: GatewayServer
    routes: StaticRoutes

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


# DATA's tests run on uvloop, as the gateway does in production (uvloop's
# transports differ from asyncio's in ways that matter to a proxy).
_UVLOOP_TESTS = {
    "test_proxy.py",
    "test_proxy_streaming.py",
    "test_proxy_errors.py",
    "test_proxy_units.py",
    "test_limits.py",
    "test_accesslog.py",
    "test_hostile.py",
    "test_server.py",
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _UVLOOP_TESTS:
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[str], Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def make(name: str) -> Upstream:
        up = await start_upstream(name)
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


@pytest.fixture
async def make_gateway(
    tmp_path: Path,
) -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    started: list[GatewayServer] = []

    async def make(**overrides: Any) -> Gateway:
        routes = StaticRoutes()
        server = GatewayServer(gateway_config(tmp_path, **overrides), routes=routes)
        await server.start()
        started.append(server)
        return Gateway(server, routes)

    yield make
    for server in started:
        await server.stop()


async def raw_request(port: int, data: bytes, *, read_timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            return await reader.read(-1)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response (Content-Length or chunked) from a stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
    if status in (100, 101, 204, 304):
        return status, headers, b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(data[:-2])
        body = b"".join(parts)
    else:
        body = await reader.read(-1)
    return status, headers, body


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll with a deadline, for state no event announces (e.g. a set becoming empty)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
