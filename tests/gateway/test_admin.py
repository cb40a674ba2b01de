from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from berth.controlplane.config import ControlPlaneConfig
from berth.controlplane.server import ControlPlaneServer
from berth.gateway.admin import create_admin_app, merged_upstream
from berth.gateway.config import GatewayConfig
from berth.gateway.discovery import Discovery
from berth.store.client import StoreClient

WAIT = "1s"  # see test_discovery.py
TOKEN = "s3cret-token"


class Served:
    """An ASGI app served by uvicorn on a real 127.0.0.1 socket (port 0)."""

    def __init__(self, app: ASGIApp) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, lifespan="off", log_config=None, access_log=False, loop="none")
        )

    async def __aenter__(self) -> Served:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            assert not self.task.done()
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await self.task
        self.sock.close()


class Env:
    def __init__(self, store: StoreClient, discovery: Discovery, http: httpx.AsyncClient) -> None:
        self.store = store
        self.discovery = discovery
        self.http = http


async def _env(tmp_path: Path, token: str | None) -> AsyncIterator[Env]:
    cp = ControlPlaneServer(ControlPlaneConfig(port=0, data_dir=tmp_path / "cp"))
    await cp.start()
    try:
        async with StoreClient(cp.url) as store:
            config = GatewayConfig(
                store_url=cp.url, data_dir=tmp_path, token=token, health_interval=0.1
            )
            discovery = Discovery(store, config, wait=WAIT)
            await discovery.start()
            try:
                async with (
                    Served(create_admin_app(discovery, config, store)) as served,
                    httpx.AsyncClient(base_url=served.url) as http,
                ):
                    yield Env(store, discovery, http)
            finally:
                await discovery.stop()
    finally:
        await cp.stop()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in _env(tmp_path, None):
        yield e


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Env]:
    async for e in _env(tmp_path, TOKEN):
        yield e


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_put_then_status_in_slardar_shape(env: Env) -> None:
    live = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    live_port = live.sockets[0].getsockname()[1]
    dead_port = closed_port()
    try:
        body = {
            "cluster": [
                {"servers": [{"host": "127.0.0.1", "port": live_port, "weight": 2}]},
                {"servers": [{"host": "127.0.0.1", "port": dead_port}]},
            ],
            "health_check": {"type": "tcp", "interval": 0.1, "rise": 1, "fall": 1},
        }
        resp = await env.http.put("/upstream/test", json=body)
        assert resp.status_code == 200
        assert resp.json() == {"status": 200, "applied": True}
        # Persisted to the store, so every gateway and a restart keep it.
        stored = await env.store.kv_get("berth/gateway/upstreams/test")
        assert stored is not None and stored.json() == body

        def checked() -> bool:
            cluster = env.discovery.table.clusters.get("test")
            return cluster is not None and [
                [srv.status.value for srv in level] for level in cluster.levels
            ] == [["ok"], ["err"]]

        assert await env.discovery.wait_for(checked, 10)
        doc = (await env.http.get("/status")).json()
        ok, err = doc["cls:test"][0][0], doc["cls:test"][1][0]
        assert ok["server"] == f"test:127.0.0.1:{live_port}"
        assert ok["weight"] == 2 and ok["status"] == "ok" and ok["msg"] is None
        assert ok["fail_num"] == 0 and len(ok["lastmodified"]) == 19
        assert err["status"] == "err" and err["msg"] == "connection refused"
        assert err["fail_num"] >= 1
        assert doc["checkup_timer_alive"] is True
        assert doc["shd_config_version"] >= 1 and doc["store"]["ready"] is True
    finally:
        live.close()
        await live.wait_closed()


async def test_servers_body_replaces_level_one_only(env: Env) -> None:
    full = {
        "cluster": [
            {"servers": [{"host": "10.0.0.1", "port": 80}]},
            {"servers": [{"host": "10.0.0.9", "port": 80}]},
        ],
        "health_check": {"type": "none"},
    }
    assert (await env.http.post("/upstream/lv", json=full)).status_code == 200
    resp = await env.http.put("/upstream/lv", json={"servers": [{"host": "10.0.0.2", "port": 80}]})
    assert resp.json()["status"] == 200
    up = (await env.http.get("/upstream/lv")).json()
    assert [[s["host"] for s in lv["servers"]] for lv in up["cluster"]] == [
        ["10.0.0.2"],
        ["10.0.0.9"],
    ]
    assert up["health_check"]["type"] == "none"
    listing = (await env.http.get("/upstreams")).json()
    assert listing["lv"] == up
    # A restarted gateway (a fresh Discovery on the same store) sees the same.
    again = Discovery(env.store, env.discovery.config, wait=WAIT)
    await again.start()
    try:
        cluster = again.table.clusters["lv"]
        assert [[s.host for s in lv] for lv in cluster.levels] == [["10.0.0.2"], ["10.0.0.9"]]
    finally:
        await again.stop()


def test_merged_upstream() -> None:
    old = {"cluster": [{"servers": [1]}, {"servers": [2]}], "health_check": {"type": "none"}}
    assert merged_upstream({"servers": [3]}, old) == {
        "cluster": [{"servers": [3]}, {"servers": [2]}],
        "health_check": {"type": "none"},
    }
    assert merged_upstream({"servers": [3]}, {"servers": [1], "protected": False}) == {
        "servers": [3],
        "protected": False,
    }
    assert merged_upstream({"cluster": [{"servers": [4]}]}, old) == {
        "cluster": [{"servers": [4]}],
        "health_check": {"type": "none"},
    }
    assert merged_upstream({"servers": [], "health_check": {"type": "tcp"}}, old)[
        "health_check"
    ] == {"type": "tcp"}
    assert merged_upstream({"servers": [5]}, None) == {"servers": [5]}
    assert merged_upstream({"protected": False}, old) == {
        "cluster": [{"servers": [1]}, {"servers": [2]}],
        "health_check": {"type": "none"},
        "protected": False,
    }


BAD_REQUESTS = [
    ("PUT", "/upstream/x", b"{nope", 400, "decode body error"),
    ("PUT", "/upstream/x", b"", 400, "decode body error"),
    ("PUT", "/upstream/x", b"[]", 400, "body invalid: must be a JSON object"),
    ("PUT", "/upstream/x", b"[" * 100_000, 400, "decode body error"),
    ("PUT", "/upstream/x", b'{"servers":[{"host":"a","port":1e999}]}', 400, "body invalid"),
    ("PUT", "/upstream/x", b"\xff\xfe", 400, "decode body error"),
    (
        "PUT",
        "/upstream/x",
        b'{"servers":[{"host":"a","port":0}]}',
        400,
        "body invalid: servers[0].port",
    ),
    ("POST", "/upstream/x", b'{"servers":[],"cluster":[]}', 400, "body invalid: servers"),
    ("PUT", "/upstream/x", b'{"servers":[],"hc":1}', 400, "body invalid: hc"),
    ("PUT", "/upstream/a%20b", b'{"servers":[]}', 400, "invalid upstream name"),
    ("PATCH", "/upstream/x", b"{}", 405, "method not allowed"),
    ("POST", "/status", b"{}", 405, "method not allowed"),
    ("DELETE", "/upstreams", b"", 405, "method not allowed"),
    ("GET", "/upstream/nothing", b"", 404, "no such upstream"),
    ("DELETE", "/upstream/nothing", b"", 404, "no such upstream"),
    ("GET", "/nowhere", b"", 404, "no such endpoint"),
    ("PUT", "/upstream/x", b" " * ((1 << 20) + 1), 413, "body over"),
]


async def test_bad_requests(env: Env) -> None:
    # One control plane for the whole table: each case is a request, not a setup.
    for method, path, body, status, msg in BAD_REQUESTS:
        resp = await env.http.request(method, path, content=body)
        assert resp.status_code == status, (method, path, resp.text)
        doc = resp.json()
        assert doc["status"] == status and doc["msg"].startswith(msg), doc
        assert await env.store.kv_get("berth/gateway/upstreams/x") is None  # nothing applied


async def test_delete(env: Env) -> None:
    await env.http.put("/upstream/gone", json={"servers": [{"host": "10.0.0.1", "port": 80}]})
    assert "gone" in env.discovery.table.clusters
    resp = await env.http.delete("/upstream/gone")
    assert resp.json() == {"status": 200, "applied": True}
    assert await env.store.kv_get("berth/gateway/upstreams/gone") is None
    assert "gone" not in env.discovery.table.clusters


async def test_token_required_for_writes(secured: Env) -> None:
    body: dict[str, Any] = {"servers": [{"host": "10.0.0.1", "port": 80}]}
    resp = await secured.http.put("/upstream/t", json=body)
    assert resp.status_code == 403 and resp.json()["status"] == 403
    resp = await secured.http.put("/upstream/t", json=body, headers={"X-Berth-Token": "wrong"})
    assert resp.status_code == 403
    assert await secured.store.kv_get("berth/gateway/upstreams/t") is None
    resp = await secured.http.put("/upstream/t", json=body, headers={"X-Berth-Token": TOKEN})
    assert resp.status_code == 200
    resp = await secured.http.delete("/upstream/t", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200
    assert (await secured.http.get("/status")).status_code == 200  # reads stay open


async def test_metrics_include_upstream_health(env: Env) -> None:
    await env.http.put(
        "/upstream/m",
        json={
            "servers": [{"host": "127.0.0.1", "port": closed_port()}],
            "health_check": {"type": "none"},
        },
    )
    resp = await env.http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    assert "berth_gateway_requests_total" in text  # the data path's part
    assert 'berth_gateway_upstream_server_up{cluster="m",server="127.0.0.1:' in text
    assert 'status="unchecked"} 1' in text
    assert "berth_gateway_routing_table_version" in text


async def test_routes_listing(env: Env) -> None:
    await env.store.kv_put(
        "berth/gateway/routes/img.example.com", json.dumps({"cluster": "img", "tries": 3})
    )
    assert await env.discovery.wait_for(lambda: bool(env.discovery.table.routes), 10)
    routes = (await env.http.get("/routes")).json()
    assert routes[0]["host"] == "img.example.com" and routes[0]["tries"] == 3


# -- through the real gateway: data path + discovery + admin ---------------------------------


class Live:
    """A real GatewayServer (its own Discovery and admin API) on a real control plane."""

    def __init__(self, server: Any, store: StoreClient, admin: httpx.AsyncClient) -> None:
        self.server = server
        self.store = store
        self.admin = admin
        self.url = f"http://127.0.0.1:{server.port}"


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    from berth.gateway.server import GatewayServer

    cp = ControlPlaneServer(ControlPlaneConfig(port=0, data_dir=tmp_path / "cp"))
    await cp.start()
    try:
        async with StoreClient(cp.url) as store:
            config = GatewayConfig(
                host="127.0.0.1",
                port=0,
                admin_port=0,
                data_dir=tmp_path,
                store_url=cp.url,
                discovery_wait=1,
                health_interval=0.1,
                health_timeout=1,
                fail_timeout=60,
            )
            server = GatewayServer(config)
            await server.start()
            try:
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{server.admin_port}"
                ) as admin:
                    yield Live(server, store, admin)
            finally:
                await server.stop()
    finally:
        await cp.stop()


class Load:
    """Clients sending requests in a loop; every answer is recorded with its start time."""

    def __init__(self, url: str, host: str, clients: int = 6) -> None:
        self.url = url
        self.host = host
        self.clients = clients
        self.results: list[tuple[float, int, str]] = []
        self.answered = asyncio.Event()  # set on every answer
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers={"Host": self.host}) as http:
            while not self._stop.is_set():
                started = asyncio.get_running_loop().time()
                resp = await http.get("/x")
                self.results.append((started, resp.status_code, resp.headers.get("x-upstream", "")))
                self.answered.set()

    def __enter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    async def finish(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _until(self, cond: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.answered.clear()
                await self.answered.wait()

    async def seen(self, name: str, timeout: float = 10.0) -> None:
        """Wait until `name` answered a request."""
        await self._until(lambda: any(up == name for _, _, up in self.results), timeout)

    async def more(self, count: int, timeout: float = 10.0) -> None:
        """Wait for `count` more answers."""
        target = len(self.results) + count
        await self._until(lambda: len(self.results) >= target, timeout)


def server_doc(up: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": up.port}


@pytest.mark.slow
async def test_store_changes_under_load_fail_no_request(live: Live, upstreams: Any) -> None:
    a, b, c = await upstreams("a"), await upstreams("b"), await upstreams("c")
    resp = await live.admin.put(
        "/upstream/svc", json={"servers": [server_doc(a)], "health_check": {"type": "none"}}
    )
    assert resp.json()["status"] == 200
    await live.store.kv_put_json("berth/gateway/routes/svc.test", {"cluster": "svc"})
    load = Load(live.url, "svc.test")
    with load:
        await load.seen("a")
        resp = await live.admin.put(
            "/upstream/svc", json={"servers": [server_doc(a), server_doc(b)]}
        )
        assert resp.json() == {"status": 200, "applied": True}
        await load.seen("b")
        resp = await live.admin.put("/upstream/svc", json={"servers": [server_doc(b)]})
        assert resp.json() == {"status": 200, "applied": True}
        only_b_from = asyncio.get_running_loop().time()
        await live.store.register_service(
            "svc", service_id="svc-c", address="127.0.0.1", port=c.port
        )
        await load.seen("c")
        await load.more(30)  # some more traffic after the last change
        await load.finish()
    statuses = {status for _, status, _ in load.results}
    assert statuses == {200}, f"failed requests during changes: {statuses}"
    assert not [r for r in load.results if r[0] > only_b_from and r[2] == "a"]
    assert len(load.results) > 50


@pytest.mark.slow
async def test_failures_and_recovery_visible_in_status(live: Live, upstreams: Any) -> None:
    good = await upstreams("good")
    flaky_port = closed_port()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream: flaky\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    body = {
        "servers": [server_doc(good), {"host": "127.0.0.1", "port": flaky_port}],
        "health_check": {"type": "tcp", "interval": 0.1, "rise": 1, "fall": 1},
    }
    assert (await live.admin.put("/upstream/mixed", json=body)).json()["status"] == 200

    async def status_of(port: int) -> dict[str, Any]:
        doc = (await live.admin.get("/status")).json()
        return next(s for s in doc["cls:mixed"][0] if s["address"].endswith(f":{port}"))

    async def wait_status(port: int, want: str) -> dict[str, Any]:
        discovery = live.server.discovery

        def reached() -> bool:
            cluster = discovery.table.clusters.get("mixed")
            server = cluster.server(f"127.0.0.1:{port}") if cluster else None
            return server is not None and server.status.value == want

        assert await discovery.wait_for(reached, 10), f"{port} never became {want}"
        return await status_of(port)

    down = await wait_status(flaky_port, "err")
    assert down["msg"] == "connection refused"
    # Traffic by the cluster's name (no route needed) only reaches the healthy server.
    async with httpx.AsyncClient(base_url=live.url, headers={"Host": "mixed"}) as http:
        for _ in range(10):
            resp = await http.get("/")
            assert resp.status_code == 200 and resp.headers["x-upstream"] == "good"
        # The server comes back on the same port: the active check restores it, no restart.
        flaky = await asyncio.start_server(answer, "127.0.0.1", flaky_port)
        try:
            await wait_status(flaky_port, "ok")
            seen = {(await http.get("/")).headers["x-upstream"] for _ in range(20)}
            assert seen == {"good", "flaky"}
        finally:
            flaky.close()
            await flaky.wait_closed()
    metrics_text = (await live.admin.get("/metrics")).text
    assert (
        f'berth_gateway_upstream_server_up{{cluster="mixed",server="127.0.0.1:{flaky_port}"}}'
        in metrics_text
    )


async def test_route_admin(env: Env) -> None:
    resp = await env.http.put("/route/Img.Example.com", json={"cluster": "img", "tries": 3})
    assert resp.json() == {"status": 200, "applied": True}
    stored = await env.store.kv_get("berth/gateway/routes/img.example.com")
    assert stored is not None and stored.json() == {"cluster": "img", "tries": 3}
    got = (await env.http.get("/route/img.example.com")).json()
    assert got[0]["cluster"] == "img" and got[0]["tries"] == 3
    resp = await env.http.put(
        "/route/*.example.com", json=[{"cluster": "a"}, {"cluster": "b", "path_prefix": "/b"}]
    )
    assert resp.status_code == 200
    found = env.discovery.table.find_route("x.example.com", "/b/1")
    assert found is not None and found.cluster == "b"
    bad = await env.http.put("/route/img.example.com", json={"cluster": "img", "lb": "random"})
    assert bad.status_code == 400 and bad.json()["msg"].startswith("body invalid: lb:")
    assert (await env.http.put("/route/bad host", json={"cluster": "a"})).status_code == 400
    assert (await env.http.patch("/route/a.com", json={})).status_code == 405
    assert (await env.http.delete("/route/img.example.com")).json()["status"] == 200
    assert (await env.http.delete("/route/img.example.com")).status_code == 404
    assert (await env.http.get("/route/img.example.com")).status_code == 404
