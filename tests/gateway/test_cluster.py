from __future__ import annotations

import time
from typing import Any

import pytest

from berth.gateway.cluster import (
    INF,
    CheckSpec,
    Cluster,
    Ejection,
    Server,
    ServerSpec,
    ServerStatus,
    build_cluster,
    merge_levels,
    parse_upstream,
    servers_by_key,
)
from berth.gateway.routes import Route

RR = Route(host="h", path_prefix="/", cluster="c")


def test_new_server_is_unchecked_and_available() -> None:
    s = Server("127.0.0.1", 8080)
    assert s.status is ServerStatus.UNCHECKED
    assert s.available(time.monotonic(), time.time())
    assert repr(s) == (
        "<Server 127.0.0.1:8080 level=1 weight=1 status=unchecked fail_num=0 active=0>"
    )
    assert Server("::1", 80).address == "[::1]:80"


def test_passive_failures_mark_err_then_rest_then_retry() -> None:
    s = Server("127.0.0.1", 1, max_fails=2, fail_timeout=10.0)
    s.record_request(False, "connection refused", now=100.0)
    assert s.status is ServerStatus.UNCHECKED and s.fail_num == 1
    s.record_request(False, "connection refused", now=100.0)
    assert s.status is ServerStatus.ERR and s.msg == "connection refused"
    assert not s.available(105.0, time.time())
    assert s.available(110.0, time.time())  # fail_timeout over: one more try
    s.record_request(False, "read timeout", now=110.0)
    assert not s.available(115.0, time.time()) and s.msg == "read timeout"
    s.record_request(True, None, now=121.0)
    # Back in rotation, shown as before: no active check has ever run on it.
    assert s.status is ServerStatus.UNCHECKED and s.fail_num == 0 and s.msg is None
    assert s.available(121.0, time.time())


def test_success_resets_consecutive_count() -> None:
    s = Server("127.0.0.1", 1, max_fails=3)
    for _ in range(5):
        s.record_request(False, "502", now=1.0)
        s.record_request(True, None, now=1.0)
    assert s.health is ServerStatus.UNCHECKED and s.fail_num == 0


def test_max_fails_zero_disables_passive() -> None:
    s = Server("127.0.0.1", 1, max_fails=0)
    for _ in range(10):
        s.record_request(False, "502", now=1.0)
    assert s.health is ServerStatus.UNCHECKED and s.fail_num == 10


def test_active_first_result_decides_then_rise_and_fall() -> None:
    s = Server("127.0.0.1", 1)
    assert s.record_check(True, None, rise=2, fall=3)
    assert s.status is ServerStatus.OK
    assert not s.record_check(False, "refused", rise=2, fall=3)
    assert not s.record_check(False, "refused", rise=2, fall=3)
    assert s.status is ServerStatus.OK and s.fail_num == 2
    assert s.record_check(False, "connection refused", rise=2, fall=3)
    assert s.status is ServerStatus.ERR and s.down_until == INF
    assert not s.available(time.monotonic() + 1e6, time.time())  # only a check restores it
    assert not s.record_check(True, None, rise=2, fall=3)
    assert s.status is ServerStatus.ERR
    assert s.record_check(True, None, rise=2, fall=3)
    assert s.status is ServerStatus.OK and s.msg is None and s.fail_num == 0

    fresh = Server("127.0.0.1", 2)
    assert fresh.record_check(False, "refused", rise=2, fall=3)
    assert fresh.status is ServerStatus.ERR


def test_active_check_restores_a_passively_failed_server() -> None:
    s = Server("127.0.0.1", 1, max_fails=1, fail_timeout=1e9)
    s.record_check(True, None, rise=1, fall=1)
    s.record_request(False, "upstream timed out", now=time.monotonic())
    assert s.status is ServerStatus.ERR
    assert not s.available(time.monotonic(), time.time())
    s.record_check(True, None, rise=1, fall=1)
    assert s.status is ServerStatus.OK and s.available(time.monotonic(), time.time())


def test_ejection_until_deadline() -> None:
    s = Server("127.0.0.1", 1)
    s.ejection = Ejection("alerts", "504 outlier", time.time() + 60)
    assert s.status is ServerStatus.EJECTED
    assert not s.available(time.monotonic(), time.time())
    s.ejection = Ejection("alerts", "504 outlier", time.time() - 1)
    assert s.status is ServerStatus.UNCHECKED
    assert s.available(time.monotonic(), time.time())


def test_ejected_servers_are_skipped_by_pick() -> None:
    a, b = Server("10.0.0.1", 80), Server("10.0.0.2", 80)
    cluster = Cluster("c", [a, b])
    a.ejection = Ejection("op", "maintenance", time.time() + 60)
    assert {cluster.pick(RR, None) for _ in range(6)} == {b}
    # Everything ejected: protect mode still serves, and says so.
    b.ejection = Ejection("op", "maintenance", time.time() + 60)
    chosen = cluster.pick(RR, None)
    assert chosen is not None and chosen.status is ServerStatus.UNSTABLE
    other = b if chosen is a else a
    assert other.status is ServerStatus.EJECTED


def test_on_request_start_end_counts_active() -> None:
    a = Server("10.0.0.1", 80)
    cluster = Cluster("c", [a])
    cluster.on_request_start(a)
    cluster.on_request_start(a)
    assert a.active == 2
    cluster.on_request_end(a, True, None)
    cluster.on_request_end(a, True, None)
    cluster.on_request_end(a, True, None)  # never below zero
    assert a.active == 0
    assert repr(cluster) == "<Cluster c levels=1 servers=1 unchecked=1>"


def test_parse_upstream_servers_is_level_one() -> None:
    spec = parse_upstream(
        "imgprocess",
        {"servers": [{"host": "127.0.0.1", "port": 8001, "weight": 2, "max_fails": 5}]},
    )
    assert spec.levels == ((ServerSpec("127.0.0.1", 8001, weight=2, level=1, max_fails=5),),)
    assert spec.check == CheckSpec() and spec.protected


def test_parse_upstream_cluster_levels_and_check() -> None:
    spec = parse_upstream(
        "img",
        {
            "cluster": [
                {"servers": [{"host": "a", "port": 1}, {"host": "b", "port": 1}]},
                {"servers": [{"host": "backup", "port": 1}]},
            ],
            "health_check": {
                "type": "http",
                "path": "/health",
                "statuses": [200, "3xx"],
                "rise": 1,
            },
            "protected": False,
            "enable": True,
        },
        defaults=CheckSpec(interval=1.0),
    )
    assert [[s.host for s in lv] for lv in spec.levels] == [["a", "b"], ["backup"]]
    assert spec.levels[1][0].level == 2
    assert spec.check.type == "http" and spec.check.path == "/health" and spec.check.rise == 1
    assert spec.check.interval == 1.0 and spec.check.fall == 3
    assert spec.check.statuses == frozenset({200, *range(300, 400)})
    assert not spec.protected


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "body:"),
        ({"servers": [], "cluster": []}, "servers:"),
        ({"servers": {}}, "servers:"),
        ({"servers": [{"port": 1}]}, "servers[0].host:"),
        ({"servers": [{"host": "a b", "port": 1}]}, "servers[0].host:"),
        ({"servers": [{"host": "a", "port": 0}]}, "servers[0].port:"),
        ({"servers": [{"host": "a", "port": "80"}]}, "servers[0].port:"),
        ({"servers": [{"host": "a", "port": 1, "weight": 0}]}, "servers[0].weight:"),
        ({"servers": [{"host": "a", "port": 1, "wieght": 2}]}, "servers[0].wieght:"),
        ({"servers": [{"host": "a", "port": 1}, {"host": "a", "port": 1}]}, "servers:"),
        ({"cluster": {}}, "cluster:"),
        ({"cluster": [[]]}, "cluster[0]:"),
        (
            {
                "cluster": [
                    {"servers": [{"host": "a", "port": 1}]},
                    {"servers": [{"host": "a", "port": 1}]},
                ]
            },
            "cluster:",
        ),
        ({"servers": [], "health_check": {"type": "udp"}}, "health_check.type:"),
        ({"servers": [], "health_check": {"path": "health"}}, "health_check.path:"),
        ({"servers": [], "health_check": {"interval": 0}}, "health_check.interval:"),
        ({"servers": [], "health_check": {"rise": 0}}, "health_check.rise:"),
        ({"servers": [], "health_check": {"statuses": ["2xxx"]}}, "health_check.statuses:"),
        ({"servers": [], "health_check": {"statuses": []}}, "health_check.statuses:"),
        ({"servers": [], "health_check": {"bogus": 1}}, "health_check.bogus:"),
        ({"servers": [], "protected": "yes"}, "protected:"),
        ({"servers": [], "extra": 1}, "extra:"),
    ],
)
def test_parse_upstream_errors(doc: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_upstream("c", doc)
    assert str(err.value).startswith(message), str(err.value)


def test_parse_upstream_settings_only() -> None:
    spec = parse_upstream("svc", {"health_check": {"type": "http", "path": "/health"}})
    assert spec.levels == () and spec.check.path == "/health"
    assert parse_upstream("svc", {}).levels == ()


def test_parse_upstream_rejects_bad_name() -> None:
    with pytest.raises(ValueError, match="name"):
        parse_upstream("a/b", {"servers": []})


def test_state_survives_rebuild_and_weights_update() -> None:
    spec = parse_upstream("c", {"servers": [{"host": "a", "port": 1}, {"host": "b", "port": 1}]})
    first = build_cluster(spec, {}, max_fails=3, fail_timeout=10)
    a = first.servers[0]
    a.record_check(False, "connection refused", rise=2, fall=1)
    spec2 = parse_upstream(
        "c",
        {
            "cluster": [
                {"servers": [{"host": "b", "port": 1}, {"host": "n", "port": 1}]},
                {"servers": [{"host": "a", "port": 1, "weight": 5, "max_fails": 1}]},
            ]
        },
    )
    second = build_cluster(spec2, servers_by_key(first), max_fails=3, fail_timeout=10)
    same = second.server("a:1")
    assert same is a
    assert a.status is ServerStatus.ERR and a.msg == "connection refused"
    assert a.level == 2 and a.weight == 5 and a.max_fails == 1
    assert second.server("b:1") is first.servers[1]
    new = second.server("n:1")
    assert new is not None and new.status is ServerStatus.UNCHECKED and new.max_fails == 3


def test_merge_catalog_into_level_one() -> None:
    static = ((ServerSpec("a", 1), ServerSpec("b", 1)), (ServerSpec("z", 1, level=2),))
    catalog = [ServerSpec("b", 1, source="catalog"), ServerSpec("c", 1, source="catalog")]
    merged = merge_levels(static, catalog)
    assert [[(s.host, s.source) for s in lv] for lv in merged] == [
        [("a", "static"), ("b", "static"), ("c", "catalog")],
        [("z", "static")],
    ]
    assert merge_levels((), catalog) == (tuple(catalog),)
    assert merge_levels((), ()) == ()
