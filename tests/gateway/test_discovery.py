from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from berth.controlplane.config import ControlPlaneConfig
from berth.controlplane.server import ControlPlaneServer
from berth.gateway.cluster import (
    CheckSpec,
    Ejection,
    ServerSpec,
    ServerStatus,
    parse_upstream,
)
from berth.gateway.config import GatewayConfig
from berth.gateway.discovery import (
    Discovery,
    StoreView,
    build_table,
    parse_entry,
    parse_routes_value,
)
from berth.gateway.routes import RoutingTable
from berth.store.client import StoreClient

NO_CHECK = CheckSpec(type="none")
# Short blocking waits: the embedded store holds a blocked read until its wait
# ends even when the client went away, and that delays the control plane's stop.
WAIT = "1s"


def table_for(view: StoreView, previous: RoutingTable | None = None) -> RoutingTable:
    return build_table(
        view,
        previous or RoutingTable(),
        default_check=NO_CHECK,
        max_fails=3,
        fail_timeout=10,
        version=1,
    )


# -- pure: entries and tables ---------------------------------------------------------------


def test_parse_entry_kinds_and_errors() -> None:
    kind, routes = parse_entry(
        "berth/gateway/routes/img.example.com", b'{"cluster":"img"}', NO_CHECK
    )
    assert kind == "route" and routes[0].host == "img.example.com"
    kind, spec = parse_entry("berth/gateway/upstreams/img", b'{"servers":[]}', NO_CHECK)
    assert kind == "upstream" and spec.name == "img"
    kind, (where, ej) = parse_entry(
        "berth/gateway/ejections/img/10.0.0.1:80",
        b'{"by":"alerts","reason":"504","until":5}',
        NO_CHECK,
    )
    assert kind == "ejection" and where == ("img", "10.0.0.1:80") and ej.until == 5.0
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_entry("berth/gateway/routes/a", b"{nope", NO_CHECK)
    with pytest.raises(ValueError, match="until"):
        parse_entry("berth/gateway/ejections/img/a:1", b'{"until":"soon"}', NO_CHECK)
    with pytest.raises(ValueError, match="ejections/<cluster>"):
        parse_entry("berth/gateway/ejections/img", b'{"until":1}', NO_CHECK)
    with pytest.raises(KeyError):
        parse_entry("berth/gateway/other/x", b"{}", NO_CHECK)


def test_route_key_may_hold_a_list_of_prefixes() -> None:
    routes = parse_routes_value(
        "a.com", [{"cluster": "x"}, {"cluster": "y", "path_prefix": "/api"}]
    )
    assert [(r.cluster, r.path_prefix) for r in routes] == [("x", "/"), ("y", "/api")]
    with pytest.raises(ValueError, match=r"^\[1\]\.lb:"):
        parse_routes_value("a.com", [{"cluster": "x"}, {"cluster": "y", "lb": "nope"}])
    with pytest.raises(ValueError, match="twice"):
        parse_routes_value("a.com", [{"cluster": "x"}, {"cluster": "y"}])


def test_build_table_merges_catalog_static_levels_and_ejections() -> None:
    static = parse_upstream(
        "img",
        {
            "cluster": [
                {"servers": [{"host": "10.0.0.1", "port": 80, "weight": 3}]},
                {"servers": [{"host": "10.0.0.9", "port": 80}]},
            ]
        },
        NO_CHECK,
    )
    view = StoreView(
        routes={
            "berth/gateway/routes/img.example.com": parse_routes_value(
                "img.example.com", {"cluster": "img"}
            )
        },
        upstreams={"img": static},
        ejections={("img", "10.0.0.2:80"): Ejection("alerts", "504 outlier", time.time() + 60)},
        services={
            "img": (
                ServerSpec("10.0.0.1", 80, source="catalog"),  # also static: static wins
                ServerSpec("10.0.0.2", 80, source="catalog"),
                ServerSpec("10.0.0.3", 80, level=3, source="catalog"),
            ),
            "imageinfo": (ServerSpec("10.0.1.1", 80, source="catalog"),),
        },
    )
    table = table_for(view)
    img = table.clusters["img"]
    assert [[(s.address, s.source, s.level) for s in lv] for lv in img.levels] == [
        [("10.0.0.1:80", "static", 1), ("10.0.0.2:80", "catalog", 1)],
        [("10.0.0.9:80", "static", 2)],
        [("10.0.0.3:80", "catalog", 3)],
    ]
    assert img.server("10.0.0.1:80").weight == 3  # type: ignore[union-attr]
    assert img.server("10.0.0.2:80").status is ServerStatus.EJECTED  # type: ignore[union-attr]
    assert table.resolve("img.example.com", "/")[1] is img  # type: ignore[index]
    assert table.resolve("imageinfo", "/")[1].name == "imageinfo"  # type: ignore[index]

    # Next table: the ejection is gone and a server left; the others keep their objects.
    kept = img.server("10.0.0.1:80")
    assert kept is not None
    kept.record_check(False, "connection refused", rise=1, fall=1)
    view2 = StoreView(
        routes=view.routes,
        upstreams=view.upstreams,
        services={"img": (ServerSpec("10.0.0.2", 80, source="catalog"),)},
    )
    table2 = table_for(view2, table)
    img2 = table2.clusters["img"]
    assert img2.server("10.0.0.1:80") is kept and kept.status is ServerStatus.ERR
    assert img2.server("10.0.0.2:80").status is ServerStatus.UNCHECKED  # type: ignore[union-attr]
    assert img2.server("10.0.0.3:80") is None
    assert "imageinfo" not in table2.clusters


# -- against a real control plane ------------------------------------------------------------


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[ControlPlaneServer]:
    cp = ControlPlaneServer(ControlPlaneConfig(port=0, data_dir=tmp_path / "cp"))
    await cp.start()
    yield cp
    await cp.stop()


@pytest.fixture
async def store(control_plane: ControlPlaneServer) -> AsyncIterator[StoreClient]:
    async with StoreClient(control_plane.url) as client:
        yield client


def gateway_config(url: str, tmp_path: Path) -> GatewayConfig:
    return GatewayConfig(store_url=url, data_dir=tmp_path, health_interval=0.1, health_timeout=1)


@pytest.fixture
async def discovery(store: StoreClient, tmp_path: Path) -> AsyncIterator[Discovery]:
    d = Discovery(store, gateway_config(store.url, tmp_path), wait=WAIT)
    await d.start()
    yield d
    await d.stop()


async def until(d: Discovery, cond: Callable[[], bool], timeout: float = 10.0) -> None:
    assert await d.wait_for(cond, timeout), "discovery never reached the expected state"


async def test_start_is_ready_with_the_store_content(store: StoreClient, tmp_path: Path) -> None:
    await store.kv_put_json("berth/gateway/routes/img.example.com", {"cluster": "img"})
    await store.kv_put_json(
        "berth/gateway/upstreams/img", {"servers": [{"host": "127.0.0.1", "port": 9}]}
    )
    d = Discovery(store, gateway_config(store.url, tmp_path), wait=WAIT)
    try:
        await d.start()
        assert d.ready.is_set()
        found = d.table.resolve("img.example.com", "/")
        assert found is not None and [s.address for s in found[1].servers] == ["127.0.0.1:9"]
        assert repr(d).startswith("<Discovery ready=True table=v")
    finally:
        await d.stop()


async def test_changes_reach_the_table(discovery: Discovery, store: StoreClient) -> None:
    await store.kv_put_json("berth/gateway/routes/a.example.com", {"cluster": "a"})
    await until(discovery, lambda: discovery.table.resolve("a.example.com", "/") is not None)
    await store.kv_put_json(
        "berth/gateway/routes/a.example.com",
        [{"cluster": "a"}, {"cluster": "b", "path_prefix": "/b"}],
    )
    await until(
        discovery,
        lambda: (
            discovery.table.find_route("a.example.com", "/b/x") is not None
            and discovery.table.find_route("a.example.com", "/b/x").cluster == "b"
        ),
    )  # type: ignore[union-attr]
    await store.kv_delete("berth/gateway/routes/a.example.com")
    await until(discovery, lambda: discovery.table.resolve("a.example.com", "/") is None)


async def test_bad_json_keeps_the_last_good_value(discovery: Discovery, store: StoreClient) -> None:
    key = "berth/gateway/routes/bad.example.com"
    await store.kv_put_json(key, {"cluster": "good"})
    await until(discovery, lambda: discovery.table.find_route("bad.example.com", "/") is not None)
    await store.kv_put(key, b"[" * 100_000)
    await until(discovery, lambda: "nested too deeply" in discovery.bad_keys.get(key, ""))
    await store.kv_put(key, b"{not json")
    await until(discovery, lambda: "not valid JSON" in discovery.bad_keys.get(key, ""))
    route = discovery.table.find_route("bad.example.com", "/")
    assert route is not None and route.cluster == "good"
    await store.kv_put_json(key, {"cluster": "good", "lb": "fastest"})
    await until(discovery, lambda: "lb:" in discovery.bad_keys.get(key, ""))
    await store.kv_put_json(key, {"cluster": "better"})
    await until(
        discovery, lambda: discovery.table.find_route("bad.example.com", "/").cluster == "better"
    )  # type: ignore[union-attr]
    assert key not in discovery.bad_keys
    # A key that was never good is ignored, and other keys still apply.
    await store.kv_put("berth/gateway/upstreams/broken", b"[1,2")
    await store.kv_put_json(
        "berth/gateway/upstreams/fine", {"servers": [{"host": "127.0.0.1", "port": 9}]}
    )
    await until(discovery, lambda: "fine" in discovery.table.clusters)
    assert "broken" not in discovery.table.clusters


async def test_catalog_instances_become_servers(discovery: Discovery, store: StoreClient) -> None:
    await store.register_service(
        "imageinfo", service_id="imageinfo-1", address="127.0.0.1", port=7001
    )
    await store.register_service(
        "imageinfo", service_id="imageinfo-2", address="127.0.0.1", port=7002, meta={"weight": "3"}
    )

    def addresses() -> list[str]:
        c = discovery.table.clusters.get("imageinfo")
        return sorted(s.address for s in c.servers) if c else []

    await until(discovery, lambda: addresses() == ["127.0.0.1:7001", "127.0.0.1:7002"])
    cluster = discovery.table.clusters["imageinfo"]
    assert cluster.server("127.0.0.1:7002").weight == 3  # type: ignore[union-attr]
    assert all(s.source == "catalog" for s in cluster.servers)
    assert discovery.table.resolve("ImageInfo:3130", "/x") is not None
    await store.deregister_service("imageinfo-1")
    await until(discovery, lambda: addresses() == ["127.0.0.1:7002"])
    await store.deregister_service("imageinfo-2")
    await until(discovery, lambda: "imageinfo" not in discovery.table.clusters)


async def test_critical_instances_are_left_out(discovery: Discovery, store: StoreClient) -> None:
    await store.register_service(
        "svc", service_id="svc-1", address="127.0.0.1", port=7003, check={"TTL": "30s"}
    )
    await store.register_service("svc", service_id="svc-2", address="127.0.0.1", port=7004)
    await until(discovery, lambda: "svc" in discovery.table.clusters)

    def addresses() -> list[str]:
        return sorted(s.address for s in discovery.table.clusters["svc"].servers)

    # A TTL check starts critical in Consul: only svc-2 passes.
    await until(discovery, lambda: addresses() == ["127.0.0.1:7004"])
    await store.check_update("service:svc-1", "pass")
    await until(discovery, lambda: addresses() == ["127.0.0.1:7003", "127.0.0.1:7004"])


async def test_ejection_and_its_expiry(discovery: Discovery, store: StoreClient) -> None:
    await store.kv_put_json(
        "berth/gateway/upstreams/ej",
        {
            "servers": [{"host": "127.0.0.1", "port": 9}, {"host": "127.0.0.1", "port": 10}],
            "health_check": {"type": "none"},
        },
    )
    await until(discovery, lambda: "ej" in discovery.table.clusters)
    await store.kv_put_json(
        "berth/gateway/ejections/ej/127.0.0.1:9",
        {"by": "alerts", "reason": "504 outlier", "until": time.time() + 1.0},
    )

    def status() -> ServerStatus:
        return discovery.table.clusters["ej"].server("127.0.0.1:9").status  # type: ignore[union-attr]

    await until(discovery, lambda: status() is ServerStatus.EJECTED)
    # The expiry needs no store change: the deadline passes and the server is back.
    deadline = time.monotonic() + 10
    while status() is ServerStatus.EJECTED:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert status() is ServerStatus.UNCHECKED
    await store.kv_put_json(
        "berth/gateway/ejections/ej/127.0.0.1:10",
        {"by": "op", "reason": "maintenance", "until": time.time() + 600},
    )
    await until(
        discovery,
        lambda: (
            discovery.table.clusters["ej"].server("127.0.0.1:10").status  # type: ignore[union-attr]
            is ServerStatus.EJECTED
        ),
    )
    await store.kv_delete("berth/gateway/ejections/ej/127.0.0.1:10")
    await until(
        discovery,
        lambda: (
            discovery.table.clusters["ej"].server("127.0.0.1:10").status  # type: ignore[union-attr]
            is ServerStatus.UNCHECKED
        ),
    )


async def test_health_state_survives_config_changes(
    discovery: Discovery, store: StoreClient
) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    key = "berth/gateway/upstreams/hc"
    await store.kv_put_json(key, {"servers": [{"host": "127.0.0.1", "port": port}]})

    def server_status() -> ServerStatus | None:
        c = discovery.table.clusters.get("hc")
        s = c.server(f"127.0.0.1:{port}") if c else None
        return s.health if s else None

    await until(discovery, lambda: server_status() is ServerStatus.ERR)
    await store.kv_put_json(
        key,
        {
            "servers": [
                {"host": "127.0.0.1", "port": port, "weight": 5},
                {"host": "127.0.0.1", "port": 9},
            ]
        },
    )
    await until(discovery, lambda: len(discovery.table.clusters["hc"].servers) == 2)
    assert server_status() is ServerStatus.ERR  # not reset by the edit (Kong#7652)
    assert discovery.table.clusters["hc"].server(f"127.0.0.1:{port}").weight == 5  # type: ignore[union-attr]


@pytest.mark.slow
async def test_store_down_at_start_then_up(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    async with StoreClient(url, timeout=2) as client:
        d = Discovery(client, gateway_config(url, tmp_path), wait=WAIT)
        try:
            await d.start()
            assert not d.ready.is_set()
            assert d.table.clusters == {} and d.store_error is not None
            cp = ControlPlaneServer(ControlPlaneConfig(port=port, data_dir=tmp_path / "cp"))
            await cp.start()
            try:
                async with StoreClient(cp.url) as writer:
                    await writer.kv_put_json(
                        "berth/gateway/routes/late.example.com", {"cluster": "x"}
                    )
                await asyncio.wait_for(d.ready.wait(), 30)
                await until(d, lambda: d.table.find_route("late.example.com", "/") is not None, 30)
                assert d.store_error is None
            finally:
                await cp.stop()
            # The store goes away again: the table stays.
            before = d.table
            await until(d, lambda: d.store_error is not None)
            assert d.table is before and d.table.find_route("late.example.com", "/") is not None
        finally:
            await d.stop()


async def test_bad_upstream_value_names_the_field(discovery: Discovery, store: StoreClient) -> None:
    await store.kv_put(
        "berth/gateway/upstreams/x", json.dumps({"servers": [{"host": "a", "port": 0}]})
    )
    await until(
        discovery,
        lambda: "servers[0].port" in discovery.bad_keys.get("berth/gateway/upstreams/x", ""),
    )


async def test_default_check_follows_the_config(tmp_path: Path) -> None:
    from pydantic import ValidationError

    config = GatewayConfig(
        data_dir=tmp_path, health_type="http", health_path="/health", health_rise=1
    )
    async with StoreClient("http://127.0.0.1:1") as client:
        d = Discovery(client, config)
        assert d.default_check == CheckSpec(type="http", path="/health", rise=1)
        assert d.wait == "300s"
    with pytest.raises(ValidationError):
        GatewayConfig(health_path="health")
    with pytest.raises(ValidationError):
        GatewayConfig(health_type="udp")  # type: ignore[arg-type]
