"""Routes: which cluster serves a (Host, path), and with which policy.

A route is JSON in the store at ``berth/gateway/routes/<host>``. The routing
table is an immutable snapshot built by discovery and swapped in whole, so a
request reads one consistent view without locks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

if TYPE_CHECKING:
    from berth.gateway.cluster import Cluster

LbPolicy = Literal["round_robin", "least_conn", "hash"]
HashOn = Literal["uri", "ip", "header"]
RateKey = Literal["ip", "route"]

# Cluster names become store keys and Prometheus labels; Slardar's admin API
# allows the same alphabet for upstream names.
NAME_RE = re.compile(r"^[-_a-zA-Z0-9.]{1,200}$")
# A DNS name, optionally starting with one "*." wildcard label.
HOST_RE = re.compile(r"^(\*\.)?[a-z0-9_]([-a-z0-9_]{0,62})?(\.[a-z0-9_]([-a-z0-9_]{0,62})?)*$")
HEADER_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-zA-Z]+$")


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 3.0  # seconds
    send: float = 60.0  # max time writing the request to the upstream (per write stall)
    read: float = 60.0  # max time waiting for upstream bytes (per read)
    total: float | None = None  # whole request incl. retries (None = no limit)


@dataclass(frozen=True, slots=True)
class Limits:
    rate: float | None = None  # requests per second (None = unlimited)
    burst: int = 0
    rate_key: RateKey = "ip"
    max_concurrent: int | None = None  # in-flight requests on this route
    max_body_size: int | None = 1 << 30  # bytes; None = unlimited


@dataclass(frozen=True, slots=True)
class Route:
    host: str  # "img.example.com", "*.example.com", or the cluster name itself
    path_prefix: str  # "/" by default
    cluster: str
    lb: LbPolicy = "round_robin"
    hash_on: HashOn = "uri"
    hash_header: str = "x-hash-key"  # lowercased by parse_route
    timeouts: Timeouts = Timeouts()
    tries: int = 2  # total attempts incl. the first
    try_timeout: float = 0.0  # budget for all attempts (0 = no budget)
    limits: Limits = Limits()
    # The label used in logs and metrics: host plus prefix when it is not "/".
    # Made once (it is read for every request).
    name: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        name = self.host if self.path_prefix == "/" else self.host + self.path_prefix
        object.__setattr__(self, "name", name)


# -- parsing ------------------------------------------------------------------------


# Upper bounds keep absurd values from overflowing timers: a day for durations.
MAX_SECONDS: Final = 86400.0
MAX_COUNT: Final = 1 << 62


def _number(
    doc: Mapping[str, Any],
    key: str,
    where: str,
    default: float | None,
    *,
    minimum: float = 0.0,
    maximum: float = MAX_SECONDS,
) -> float | None:
    value = doc.get(key, default)
    if value is None:
        return None
    # bool is an int in Python; "tries": true is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}{key}: must be a number, got {_short(value)}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{where}{key}: must be from {minimum:g} to {maximum:g}, got {value!r}")
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _integer(
    doc: Mapping[str, Any], key: str, where: str, default: int | None, *, minimum: int = 0
) -> int | None:
    value = doc.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}{key}: must be an integer, got {_short(value)}")
    if not minimum <= value <= MAX_COUNT:
        raise ValueError(f"{where}{key}: must be from {minimum} to {MAX_COUNT}, got {value}")
    return value


def _choice(
    doc: Mapping[str, Any], key: str, where: str, allowed: tuple[str, ...], default: str
) -> str:
    value = doc.get(key, default)
    if value not in allowed:
        raise ValueError(f"{where}{key}: must be one of {', '.join(allowed)}; got {_short(value)}")
    return str(value)


def _no_unknown(doc: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ValueError(
            f"{where}{unknown[0]}: unknown field (allowed: {', '.join(sorted(known))})"
        )


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: must be a JSON object, got {type(value).__name__}")
    return value


_ROUTE_FIELDS: Final = (
    "cluster",
    "service",
    "path_prefix",
    "lb",
    "hash_on",
    "hash_header",
    "timeouts",
    "tries",
    "try_timeout",
    "limits",
)


def normalize_host(host: str) -> str:
    """Lowercase, strip the port and a trailing dot: "Img.Example.COM.:80" -> "img.example.com"."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal, maybe with a port
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(":")
    if colon >= 0 and host.count(":") == 1:
        host = host[:colon]
    return host.rstrip(".")


def parse_route(host: str, doc: Mapping[str, Any]) -> Route:
    """Build a Route from its store JSON; ValueError naming the offending field."""
    route_host = normalize_host(host)
    if not HOST_RE.match(route_host):
        raise ValueError(f"host: {_short(host)} is not a host name or *.suffix wildcard")
    doc = _mapping(doc, "route")
    _no_unknown(doc, _ROUTE_FIELDS, "")

    # "service" is accepted as an alias: a route usually points at the catalog service.
    if "cluster" in doc and "service" in doc and doc["cluster"] != doc["service"]:
        raise ValueError("cluster: conflicts with service (give one of them)")
    cluster = doc.get("cluster", doc.get("service"))
    if cluster is None:
        raise ValueError("cluster: required")
    if not isinstance(cluster, str) or not NAME_RE.match(cluster):
        raise ValueError(f"cluster: must be a name of [-_a-zA-Z0-9.], got {_short(cluster)}")

    prefix = doc.get("path_prefix", "/")
    if not isinstance(prefix, str) or not prefix.startswith("/") or any(c in prefix for c in "?# "):
        raise ValueError(f"path_prefix: must be a path starting with '/', got {_short(prefix)}")

    lb = _choice(doc, "lb", "", get_args(LbPolicy), "round_robin")
    hash_on = _choice(doc, "hash_on", "", get_args(HashOn), "uri")
    hash_header = doc.get("hash_header", "x-hash-key")
    if not isinstance(hash_header, str) or not HEADER_RE.match(hash_header):
        raise ValueError(f"hash_header: must be a header name, got {_short(hash_header)}")

    t = _mapping(doc.get("timeouts", {}), "timeouts")
    _no_unknown(t, ("connect", "send", "read", "total"), "timeouts.")
    d = Timeouts()
    timeouts = Timeouts(
        connect=_positive(t, "connect", d.connect),
        send=_positive(t, "send", d.send),
        read=_positive(t, "read", d.read),
        total=_number(t, "total", "timeouts.", None, minimum=0.001),
    )

    lim = _mapping(doc.get("limits", {}), "limits")
    _no_unknown(lim, ("rate", "burst", "rate_key", "max_concurrent", "max_body_size"), "limits.")
    dl = Limits()
    # An explicit null means unlimited; a missing key means the default.
    max_body = _integer(lim, "max_body_size", "limits.", dl.max_body_size)
    limits = Limits(
        rate=_number(lim, "rate", "limits.", None, minimum=0.001, maximum=1e9),
        burst=_integer(lim, "burst", "limits.", 0) or 0,
        rate_key=_choice(lim, "rate_key", "limits.", get_args(RateKey), "ip"),  # type: ignore[arg-type]
        max_concurrent=_integer(lim, "max_concurrent", "limits.", None, minimum=1),
        max_body_size=max_body,
    )

    tries = _integer(doc, "tries", "", 2, minimum=1)
    if tries is not None and tries > 100:
        raise ValueError(f"tries: must be <= 100, got {tries}")
    return Route(
        host=route_host,
        path_prefix=prefix,
        cluster=cluster,
        lb=lb,  # type: ignore[arg-type]
        hash_on=hash_on,  # type: ignore[arg-type]
        hash_header=hash_header.lower(),
        timeouts=timeouts,
        tries=tries or 2,
        try_timeout=_number(doc, "try_timeout", "", 0.0) or 0.0,
        limits=limits,
    )


def _positive(doc: Mapping[str, Any], key: str, default: float) -> float:
    value = _number(doc, key, "timeouts.", default, minimum=0.001)
    return default if value is None else value


def route_to_json(route: Route) -> dict[str, Any]:
    """The store JSON for a route (the inverse of parse_route, host aside)."""
    t, lim = route.timeouts, route.limits
    return {
        "cluster": route.cluster,
        "path_prefix": route.path_prefix,
        "lb": route.lb,
        "hash_on": route.hash_on,
        "hash_header": route.hash_header,
        "timeouts": {"connect": t.connect, "send": t.send, "read": t.read, "total": t.total},
        "tries": route.tries,
        "try_timeout": route.try_timeout,
        "limits": {
            "rate": lim.rate,
            "burst": lim.burst,
            "rate_key": lim.rate_key,
            "max_concurrent": lim.max_concurrent,
            "max_body_size": lim.max_body_size,
        },
    }


# -- the table ------------------------------------------------------------------------


def _origin_path(target: str) -> str:
    """The path of an absolute-form ("http://h/p") or asterisk-form ("*") request target."""
    scheme = target.find("://")
    if scheme > 0:
        slash = target.find("/", scheme + 3)
        return target[slash:] if slash >= 0 else "/"
    return "/"


def _by_prefix(routes: Iterable[Route]) -> tuple[Route, ...]:
    # Longest prefix first so the first match is the most specific one.
    return tuple(sorted(routes, key=lambda r: (-len(r.path_prefix), r.path_prefix)))


def _match(routes: tuple[Route, ...], path: str) -> Route | None:
    for route in routes:
        if path.startswith(route.path_prefix):
            return route
    return None


class RoutingTable:
    """An immutable snapshot of routes and clusters; discovery swaps a new one in atomically.

    Precedence, as in nginx server_name and Envoy virtual hosts: the exact host,
    then the longest "*.suffix" wildcard; within a host the longest path prefix.
    A host with no route but a cluster of the same name gets a default route to
    that cluster (Slardar routes by Host = upstream name).
    """

    __slots__ = ("_default", "_exact", "_wild", "clusters", "routes", "version")

    def __init__(
        self,
        routes: Iterable[Route] = (),
        clusters: Mapping[str, Cluster] | None = None,
        version: int = 0,
    ) -> None:
        from berth.gateway.cluster import Cluster

        self.routes = tuple(routes)
        self.version = version
        all_clusters = dict(clusters or {})
        # A route to a cluster nobody defined yet (its service is not deployed)
        # resolves to an empty cluster: the client gets 503 "no server", not 404.
        for route in self.routes:
            if route.cluster not in all_clusters:
                all_clusters[route.cluster] = Cluster(route.cluster, ())
        self.clusters: Mapping[str, Cluster] = MappingProxyType(all_clusters)
        exact: dict[str, list[Route]] = {}
        wild: dict[str, list[Route]] = {}
        for route in self.routes:
            if route.host.startswith("*."):
                wild.setdefault(route.host[1:], []).append(route)  # key ".example.com"
            else:
                exact.setdefault(route.host, []).append(route)
        self._exact = {h: _by_prefix(rs) for h, rs in exact.items()}
        self._wild = {s: _by_prefix(rs) for s, rs in wild.items()}
        self._default = {
            name.lower(): Route(host=name.lower(), path_prefix="/", cluster=name)
            for name in all_clusters
        }

    def __repr__(self) -> str:
        return (
            f"<RoutingTable v{self.version} routes={len(self.routes)} "
            f"clusters={sorted(self.clusters)}>"
        )

    def resolve(self, host: str, path: str) -> tuple[Route, Cluster] | None:
        route = self.find_route(host, path)
        if route is None:
            return None
        return route, self.clusters[route.cluster]

    def find_route(self, host: str, path: str) -> Route | None:
        host = normalize_host(host)
        if not path.startswith("/"):
            path = _origin_path(path)
        query = path.find("?")
        if query >= 0:
            path = path[:query]
        if (routes := self._exact.get(host)) and (route := _match(routes, path)):
            return route
        if self._wild:
            # "a.b.example.com" tries ".b.example.com" then ".example.com" then ".com".
            dot = host.find(".")
            while dot >= 0:
                routes = self._wild.get(host[dot:])
                if routes and (route := _match(routes, path)):
                    return route
                dot = host.find(".", dot + 1)
        return self._default.get(host)
