"""Services, checks, health and catalog over real sockets; checks run by the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from berth.listen import bind
from tests.store.conftest import RunningStore, eventually


def _index(resp: httpx.Response) -> int:
    return int(resp.headers["X-Consul-Index"])


async def _status_of(http: httpx.AsyncClient, check_id: str) -> str:
    checks = (await http.get("/v1/agent/checks")).json()
    return str(checks[check_id]["Status"]) if check_id in checks else "absent"


async def test_register_py_consul_style_lowercase(http: httpx.AsyncClient) -> None:
    body = {
        "name": "web",
        "id": "web1",
        "address": "10.0.0.1",
        "port": 80,
        "tags": ["a", "b"],
        "meta": {"Version": "1"},
        "checks": [{"ttl": "15s"}],
    }
    r = await http.put("/v1/agent/service/register", json=body)
    assert r.status_code == 200 and r.content == b""
    services = (await http.get("/v1/agent/services")).json()
    assert services["web1"]["Service"] == "web"
    assert services["web1"]["Meta"] == {"Version": "1"}  # meta keys kept verbatim
    assert services["web1"]["Weights"] == {"Passing": 1, "Warning": 1}
    checks = (await http.get("/v1/agent/checks")).json()
    assert checks["service:web1"]["Status"] == "critical"  # checks start critical
    assert checks["service:web1"]["Name"] == "Service 'web' check"


async def test_register_consul_style_and_snake_case(http: httpx.AsyncClient) -> None:
    body = {
        "Name": "api",
        "ID": "api-1",
        "Port": 8080,
        "Checks": [
            {"CheckID": "api-ttl", "TTL": "30s", "Status": "passing"},
            {"ttl": "30s", "deregister_critical_service_after": "1m"},
        ],
    }
    assert (await http.put("/v1/agent/service/register", json=body)).status_code == 200
    checks = (await http.get("/v1/agent/checks")).json()
    assert checks["api-ttl"]["Status"] == "passing"
    assert checks["service:api-1:2"]["Status"] == "critical"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Port": 1}, "Missing service name"),
        ({"Name": "x", "Port": 70000}, "Invalid service port"),
        ({"Name": "x", "Check": {"HTTP": "http://x/"}}, "Interval must be > 0"),
        ({"Name": "x", "Check": {"HTTP": "ftp://x/", "Interval": "1s"}}, "http://"),
        ({"Name": "x", "Check": {"HTTP": "http://[::1", "Interval": "1s"}}, "http://"),
        ({"Name": "x", "Check": {"HTTP": "http://h:99999/", "Interval": "1s"}}, "port"),
        ({"Name": "x", "Check": {"TCP": "127.0.0.1:99999", "Interval": "1s"}}, "port"),
        ({"Name": "x", "Check": {"TTL": -5}}, "exactly one"),
        ({"Name": "x", "Check": {"TTL": "1s", "TCP": "a:1", "Interval": "1s"}}, "exactly one"),
        ({"Name": "x", "Check": {"TTL": "soon"}}, "invalid ttl"),
        ({"Name": "x", "Check": {"GRPC": "a:1", "Interval": "1s"}}, "not supported"),
        ({"Name": "x", "Check": {"TTL": "1s", "Status": "great"}}, "invalid Status"),
        ({"Name": "x", "Tags": "a"}, "Tags must be a list"),
        ({"Name": "x", "Meta": {"k": 1}}, "Meta must be an object of strings"),
        ([1, 2], "must be a JSON object"),
    ],
)
async def test_register_bad_definitions(
    running: RunningStore, http: httpx.AsyncClient, body: object, message: str
) -> None:
    r = await http.put("/v1/agent/service/register", json=body)
    assert r.status_code == 400 and message in r.text, r.text
    assert running.store.state.services == {}
    r = await http.put("/v1/agent/service/register", content=b"{oops")
    assert r.status_code == 400


async def test_ttl_pass_health_passing_and_blocking(http: httpx.AsyncClient) -> None:
    await http.put(
        "/v1/agent/service/register",
        json={"Name": "web", "ID": "web1", "Port": 1, "Tags": ["v1"], "Check": {"TTL": "30s"}},
    )
    await http.put(
        "/v1/agent/service/register",
        json={"Name": "web", "ID": "web2", "Port": 2, "Check": {"TTL": "30s"}},
    )
    r = await http.get("/v1/health/service/web")
    assert [e["Service"]["ID"] for e in r.json()] == ["web1", "web2"]
    entry = r.json()[0]
    assert entry["Node"]["Node"] == "berth"
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "service:web1"]
    r = await http.get("/v1/health/service/web", params={"passing": ""})
    assert r.json() == []
    idx = _index(r)
    waiter = asyncio.create_task(
        http.get("/v1/health/service/web", params={"passing": "1", "index": idx, "wait": "30s"})
    )
    await asyncio.sleep(0.05)
    r = await http.put("/v1/agent/check/pass/service:web1", params={"note": "all good"})
    assert r.status_code == 200
    r = await asyncio.wait_for(waiter, 5)
    assert [e["Service"]["ID"] for e in r.json()] == ["web1"]
    assert r.json()[0]["Checks"][1]["Output"] == "all good"
    r = await http.get("/v1/health/service/web", params={"passing": "", "tag": "v1"})
    assert len(r.json()) == 1
    r = await http.get("/v1/health/service/web", params={"tag": "nope"})
    assert r.json() == []
    r = await http.get("/v1/health/service/unknown")
    assert r.status_code == 200 and r.json() == [] and "X-Consul-Index" in r.headers
    # warn counts as not passing
    await http.put("/v1/agent/check/warn/service:web1")
    assert (await http.get("/v1/health/service/web", params={"passing": ""})).json() == []
    r = await http.put(
        "/v1/agent/check/update/service:web2", json={"Status": "passing", "Output": "ok"}
    )
    assert r.status_code == 200
    passing = (await http.get("/v1/health/service/web", params={"passing": ""})).json()
    assert [e["Service"]["ID"] for e in passing] == ["web2"]
    r = await http.put("/v1/agent/check/update/service:web2", json={"Status": "bogus"})
    assert r.status_code == 400
    r = await http.put("/v1/agent/check/pass/no-such-check")
    assert r.status_code == 500 and "does not have associated TTL" in r.text


async def test_ttl_expires_to_critical(running: RunningStore, http: httpx.AsyncClient) -> None:
    await http.put(
        "/v1/agent/service/register",
        json={"Name": "t", "Check": {"TTL": "0.3s", "Status": "passing"}},
    )
    assert await _status_of(http, "service:t") == "passing"

    async def expired() -> bool:
        checks = (await http.get("/v1/agent/checks")).json()
        return bool(checks["service:t"]["Status"] == "critical") and (
            checks["service:t"]["Output"] == "TTL expired"
        )

    await eventually(expired)


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A tiny real HTTP server whose /health answers with a status the test sets."""
    status = {"code": 200}

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        assert scope["type"] in ("http", "lifespan")
        if scope["type"] == "lifespan":
            return
        await send(  # type: ignore[operator]
            {"type": "http.response.start", "status": status["code"], "headers": []}
        )
        await send({"type": "http.response.body", "body": b"state"})  # type: ignore[operator]

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", loop="none", log_config=None, access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", status
    server.should_exit = True
    await task
    sock.close()


async def test_http_check_run_by_store(
    http: httpx.AsyncClient, upstream: tuple[str, dict[str, int]]
) -> None:
    url, status = upstream
    body = {"Name": "img", "Check": {"HTTP": url + "/health", "Interval": "1s", "Timeout": "1s"}}
    await http.put("/v1/agent/service/register", json=body)

    async def has(state: str) -> bool:
        return await _status_of(http, "service:img") == state

    await eventually(lambda: has("passing"))
    checks = (await http.get("/v1/agent/checks")).json()
    assert "200" in checks["service:img"]["Output"]
    status["code"] = 429
    await eventually(lambda: has("warning"))
    status["code"] = 503
    await eventually(lambda: has("critical"))


async def test_http_check_sends_non_ascii_header_values(
    http: httpx.AsyncClient, upstream: tuple[str, dict[str, int]]
) -> None:
    # Consul sends header values as given; the probe must not die on them (a
    # dead probe leaves the check at whatever status it had, forever).
    url, _ = upstream
    check = {"HTTP": url + "/health", "Interval": "1s", "Header": {"X-Who": ["café"]}}
    await http.put("/v1/agent/service/register", json={"Name": "utf", "Check": check})

    async def passing() -> bool:
        return await _status_of(http, "service:utf") == "passing"

    await eventually(passing)


async def test_tcp_check_and_reaper(running: RunningStore, http: httpx.AsyncClient) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = {
        "Name": "tcpsvc",
        "Check": {
            "TCP": f"127.0.0.1:{port}",
            "Interval": "1s",
            "DeregisterCriticalServiceAfter": "0.5s",
        },
    }
    await http.put("/v1/agent/service/register", json=body)

    async def passing() -> bool:
        return await _status_of(http, "service:tcpsvc") == "passing"

    await eventually(passing)
    server.close()
    await server.wait_closed()

    async def reaped() -> bool:
        return "tcpsvc" not in (await http.get("/v1/agent/services")).json()

    await eventually(reaped)
    assert "service:tcpsvc" not in running.store.state.checks


async def test_catalog_and_deregister(http: httpx.AsyncClient) -> None:
    await http.put(
        "/v1/agent/service/register",
        json={"Name": "db", "ID": "db1", "Tags": ["primary"], "Port": 5432, "Address": ""},
    )
    r = await http.get("/v1/catalog/services")
    assert r.json() == {"consul": [], "db": ["primary"]}
    idx = _index(r)
    r = await http.get("/v1/catalog/service/db")
    [entry] = r.json()
    assert entry["ServiceID"] == "db1" and entry["ServicePort"] == 5432
    assert entry["Address"] == "127.0.0.1" and entry["ServiceAddress"] == ""
    waiter = asyncio.create_task(
        http.get("/v1/catalog/services", params={"index": idx, "wait": "30s"})
    )
    await asyncio.sleep(0.05)
    assert (await http.put("/v1/agent/service/deregister/db1")).status_code == 200
    r = await asyncio.wait_for(waiter, 5)
    assert r.json() == {"consul": []} and _index(r) > idx
    assert (await http.get("/v1/agent/checks")).json() == {}
    # Deregistering what is not there is a no-op.
    assert (await http.put("/v1/agent/service/deregister/db1")).status_code == 200
    assert (await http.get("/v1/agent/service/db1")).status_code == 404
    assert (await http.get("/v1/status/leader")).json() == "127.0.0.1:8300"
    assert (await http.get("/v1/status/peers")).json() == ["127.0.0.1:8300"]
    assert (await http.get("/v1/health/service/db", params={"filter": "x"})).status_code == 400


async def test_check_register_node_and_service_checks(http: httpx.AsyncClient) -> None:
    await http.put("/v1/agent/service/register", json={"Name": "app", "ID": "app1"})
    r = await http.put(
        "/v1/agent/check/register",
        json={"Name": "app-ttl", "ServiceID": "app1", "TTL": "30s", "Status": "passing"},
    )
    assert r.status_code == 200
    r = await http.get("/v1/health/service/app", params={"passing": ""})
    assert [c["CheckID"] for c in r.json()[0]["Checks"]] == ["serfHealth", "app-ttl"]
    idx = _index(r)
    waiter = asyncio.create_task(
        http.get("/v1/health/service/app", params={"passing": "", "index": idx, "wait": "30s"})
    )
    await asyncio.sleep(0.05)
    # A node-level check going critical takes every service on the node out.
    r = await http.put("/v1/agent/check/register", json={"Name": "disk", "TTL": "30s"})
    assert r.status_code == 200
    r = await asyncio.wait_for(waiter, 5)
    assert r.json() == []
    await http.put("/v1/agent/check/pass/disk")
    assert len((await http.get("/v1/health/service/app", params={"passing": ""})).json()) == 1
    r = await http.put(
        "/v1/agent/check/register", json={"Name": "x", "ServiceID": "nope", "TTL": "1s"}
    )
    assert r.status_code == 500 and "does not exist" in r.text
    assert (await http.put("/v1/agent/check/register", json={"TTL": "1s"})).status_code == 400
    assert (await http.put("/v1/agent/check/deregister/disk")).status_code == 200
    assert "disk" not in (await http.get("/v1/agent/checks")).json()


async def test_check_kind_change_stops_the_old_runner(
    running: RunningStore, http: httpx.AsyncClient, upstream: tuple[str, dict[str, int]]
) -> None:
    url, _ = upstream
    http_check = {"Name": "k", "Check": {"HTTP": url, "Interval": "1s"}}
    await http.put("/v1/agent/service/register", json=http_check)
    await eventually(lambda: "probes=1 ttl=0" in repr(running.store.checks))
    await http.put("/v1/agent/service/register", json={"Name": "k", "Check": {"TTL": "30s"}})
    await eventually(lambda: "probes=0 ttl=1" in repr(running.store.checks))
    await http.put("/v1/agent/service/deregister/k")
    await eventually(lambda: "probes=0 ttl=0" in repr(running.store.checks))
