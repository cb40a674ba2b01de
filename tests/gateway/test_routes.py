from __future__ import annotations

import random
from typing import Any

import pytest

from berth.gateway.cluster import Cluster, Server
from berth.gateway.routes import (
    Limits,
    Route,
    RoutingTable,
    normalize_host,
    parse_route,
    route_to_json,
)


def route(host: str, cluster: str, prefix: str = "/") -> Route:
    return Route(host=host, path_prefix=prefix, cluster=cluster)


def test_parse_full_route() -> None:
    r = parse_route(
        "Img.Example.com",
        {
            "cluster": "imgprocess",
            "path_prefix": "/api",
            "lb": "hash",
            "hash_on": "header",
            "hash_header": "X-User",
            "timeouts": {"connect": 1, "read": 5.5, "total": 30},
            "tries": 3,
            "try_timeout": 10,
            "limits": {"rate": 100, "burst": 20, "rate_key": "route", "max_concurrent": 8},
        },
    )
    assert r.host == "img.example.com"
    assert r.path_prefix == "/api"
    assert r.lb == "hash" and r.hash_on == "header" and r.hash_header == "x-user"
    assert r.timeouts.connect == 1.0 and r.timeouts.read == 5.5 and r.timeouts.send == 60.0
    assert r.timeouts.total == 30.0
    assert r.tries == 3 and r.try_timeout == 10.0
    assert r.limits == Limits(rate=100.0, burst=20, rate_key="route", max_concurrent=8)
    assert parse_route("img.example.com", route_to_json(r)) == r


def test_parse_defaults_and_service_alias() -> None:
    r = parse_route("imageinfo", {"service": "imageinfo"})
    assert r == Route(host="imageinfo", path_prefix="/", cluster="imageinfo")
    assert (
        parse_route("x", {"cluster": "c", "limits": {"max_body_size": None}}).limits.max_body_size
        is None
    )


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({}, "cluster"),
        ({"cluster": 3}, "cluster"),
        ({"cluster": "a b"}, "cluster"),
        ({"cluster": "a", "service": "b"}, "cluster"),
        ({"cluster": "a", "path_prefix": "api"}, "path_prefix"),
        ({"cluster": "a", "lb": "random"}, "lb"),
        ({"cluster": "a", "hash_on": "cookie"}, "hash_on"),
        ({"cluster": "a", "hash_header": "bad header"}, "hash_header"),
        ({"cluster": "a", "timeouts": {"connect": -1}}, "timeouts.connect"),
        ({"cluster": "a", "timeouts": {"read": "5s"}}, "timeouts.read"),
        ({"cluster": "a", "timeouts": {"conect": 1}}, "timeouts.conect"),
        ({"cluster": "a", "timeouts": []}, "timeouts"),
        ({"cluster": "a", "tries": 0}, "tries"),
        ({"cluster": "a", "tries": True}, "tries"),
        ({"cluster": "a", "tries": 1.5}, "tries"),
        ({"cluster": "a", "try_timeout": float("nan")}, "try_timeout"),
        ({"cluster": "a", "limits": {"rate": 0}}, "limits.rate"),
        ({"cluster": "a", "limits": {"burst": -1}}, "limits.burst"),
        ({"cluster": "a", "limits": {"rate_key": "user"}}, "limits.rate_key"),
        ({"cluster": "a", "limits": {"max_concurrent": 0}}, "limits.max_concurrent"),
        ({"cluster": "a", "limits": {"max_body_size": -5}}, "limits.max_body_size"),
        ({"cluster": "a", "retries": 3}, "retries"),
    ],
)
def test_parse_errors_name_the_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_route("h.example.com", doc)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_parse_rejects_bad_host_and_non_object() -> None:
    with pytest.raises(ValueError, match=r"^host:"):
        parse_route("bad host", {"cluster": "a"})
    with pytest.raises(ValueError, match=r"^host:"):
        parse_route("a.*.com", {"cluster": "a"})
    with pytest.raises(ValueError, match=r"^route:"):
        parse_route("a.com", ["cluster"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("Img.Example.COM", "img.example.com"),
        ("img.example.com:3130", "img.example.com"),
        ("img.example.com.", "img.example.com"),
        ("[::1]:80", "[::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
    ],
)
def test_normalize_host(raw: str, host: str) -> None:
    assert normalize_host(raw) == host


def make_table() -> RoutingTable:
    clusters = {n: Cluster(n, [Server("127.0.0.1", 1)]) for n in ("a", "b", "c", "d", "imageinfo")}
    return RoutingTable(
        [
            route("img.example.com", "a"),
            route("img.example.com", "b", "/api"),
            route("img.example.com", "c", "/api/v2"),
            route("*.example.com", "d"),
            route("*.cdn.example.com", "c"),
            route("*.prefix.test", "b", "/only"),
        ],
        clusters,
        version=7,
    )


@pytest.mark.parametrize(
    ("host", "path", "cluster"),
    [
        ("img.example.com", "/", "a"),
        ("IMG.example.com:3130", "/x", "a"),
        ("img.example.com", "/api", "b"),
        ("img.example.com", "/api/v1/x", "b"),
        ("img.example.com", "/api/v2/x?q=/api", "c"),
        ("img.example.com", "/?/api/v2", "a"),
        ("other.example.com", "/", "d"),
        ("a.b.example.com", "/", "d"),
        ("x.cdn.example.com", "/", "c"),
        ("imageinfo", "/", "imageinfo"),
        ("ImageInfo:3130", "/upload", "imageinfo"),
        ("x.prefix.test", "/only/this", "b"),
        ("img.example.com", "http://img.example.com/api/v2/x", "c"),
        ("img.example.com", "http://img.example.com", "a"),
        ("img.example.com", "*", "a"),
    ],
)
def test_resolve(host: str, path: str, cluster: str) -> None:
    found = make_table().resolve(host, path)
    assert found is not None
    r, c = found
    assert r.cluster == cluster and c.name == cluster


@pytest.mark.parametrize(
    ("host", "path"),
    [("example.com", "/"), ("unknown", "/"), ("x.prefix.test", "/other"), ("", "/")],
)
def test_resolve_misses(host: str, path: str) -> None:
    assert make_table().resolve(host, path) is None


def test_route_to_undefined_cluster_gets_an_empty_cluster() -> None:
    table = RoutingTable([route("svc.example.com", "notyet")], {})
    found = table.resolve("svc.example.com", "/")
    assert found is not None
    assert found[1].servers == ()
    assert found[1].pick(found[0], None, ()) is None


def test_table_repr_and_immutability() -> None:
    table = make_table()
    assert repr(table).startswith(
        "<RoutingTable v7 routes=6 clusters=['a', 'b', 'c', 'd', 'imageinfo']"
    )
    with pytest.raises(TypeError):
        table.clusters["z"] = Cluster("z", ())  # type: ignore[index]


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "float", "str", "bool", "null", "big"]
    if depth < 3:
        kinds += ["list", "dict", "dict"]
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.randint(-5, 70000)
    if kind == "big":
        return rng.choice([10**30, -(10**30), 1e308, float("inf"), float("nan"), 2**63])
    if kind == "float":
        return rng.uniform(-10, 100)
    if kind == "str":
        return rng.choice(
            ["", "/", "a", "*.x", "round_robin", "hash", "ip", "x y", "\r\n", "é", "2xx"]
        )
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = [
        "cluster", "service", "path_prefix", "lb", "hash_on", "hash_header", "timeouts", "tries",
        "try_timeout", "limits", "connect", "read", "send", "total", "rate", "burst", "rate_key",
        "max_concurrent", "max_body_size", "servers", "cluster", "host", "port", "weight",
        "health_check", "type", "path", "statuses", "interval", "rise", "fall", "protected", "zz",
    ]  # fmt: skip
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


VALID_ROUTE: dict[str, Any] = {
    "cluster": "img",
    "path_prefix": "/api",
    "lb": "hash",
    "hash_on": "header",
    "timeouts": {"connect": 1, "read": 5, "send": 5, "total": 30},
    "tries": 3,
    "try_timeout": 2,
    "limits": {"rate": 10, "burst": 5, "rate_key": "ip", "max_concurrent": 4, "max_body_size": 9},
}
VALID_UPSTREAM: dict[str, Any] = {
    "cluster": [
        {"servers": [{"host": "10.0.0.1", "port": 80, "weight": 2, "max_fails": 1}]},
        {"servers": [{"host": "b", "port": 81, "fail_timeout": 3}]},
    ],
    "health_check": {"type": "http", "path": "/h", "statuses": [200, "3xx"], "interval": 1},
    "protected": True,
}


def _mutate(rng: random.Random, doc: Any) -> Any:
    """A copy of ``doc`` with one random node replaced, removed or added to."""
    if isinstance(doc, dict) and doc and rng.random() < 0.7:
        key = rng.choice(list(doc))
        out = dict(doc)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out["bogus"] = _random_json(rng)
        else:
            out[key] = _mutate(rng, doc[key])
        return out
    if isinstance(doc, list) and doc and rng.random() < 0.7:
        out = list(doc)
        i = rng.randrange(len(out))
        out[i] = _mutate(rng, out[i])
        return out
    return _random_json(rng)


def test_hostile_documents_only_raise_value_error() -> None:
    from berth.gateway.cluster import parse_upstream

    rng = random.Random(1234)
    accepted = rejected = 0
    for _ in range(3000):
        cases = [
            (lambda d: parse_route("h.example.com", d), _mutate(rng, VALID_ROUTE)),
            (lambda d: parse_upstream("u", d), _mutate(rng, VALID_UPSTREAM)),
        ]
        for parse, doc in cases:
            try:
                parse(doc)
                accepted += 1
            except ValueError as exc:
                rejected += 1
                assert str(exc) and len(str(exc)) < 400
    assert accepted > 500 and rejected > 500
