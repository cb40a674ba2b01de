"""Clusters of upstream servers: their health state and the choice of a server.

A ``Server`` is mutable state (health, failures, in-flight count, balancer
weights) kept across routing-table swaps: discovery hands the same object to
the next table while the server stays, so a config change never resets health
(the complaint of Kong#7652). ``Cluster`` is rebuilt on every swap and holds
the levels; ``pick`` decides, the proxy does the I/O and reports back.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

from berth.gateway import balancer

if TYPE_CHECKING:
    from berth.gateway.routes import Route

INF: Final = math.inf


class ServerStatus(enum.Enum):
    OK = "ok"
    ERR = "err"
    UNSTABLE = "unstable"  # down like the others, but chosen anyway by protect mode
    EJECTED = "ejected"  # taken out through the store (alerts, operator) until a deadline
    UNCHECKED = "unchecked"  # no active check result yet (or checks are off)


@dataclass(frozen=True, slots=True)
class Ejection:
    by: str
    reason: str
    until: float  # epoch seconds: the store is shared between hosts, so wall-clock time


class Server:
    """One upstream address within one cluster; identity is (host, port)."""

    __slots__ = (
        "_check_fails",
        "_check_oks",
        "_req_fails",
        "active",
        "address",
        "current_weight",
        "down_until",
        "effective_weight",
        "ejection",
        "fail_num",
        "fail_timeout",
        "health",
        "host",
        "lastmodified",
        "level",
        "max_fails",
        "msg",
        "port",
        "source",
        "unstable",
        "weight",
    )

    def __init__(
        self,
        host: str,
        port: int,
        weight: int = 1,
        level: int = 1,
        *,
        max_fails: int = 3,
        fail_timeout: float = 10.0,
        source: Literal["static", "catalog"] = "static",
    ) -> None:
        self.host = host
        self.port = port
        # "host:port" ("[v6]:port"), made once: it is read for every request.
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.weight = weight
        self.level = level
        self.max_fails = max_fails  # consecutive request failures before ERR; 0 = off
        self.fail_timeout = fail_timeout  # seconds a passively failed server rests
        self.source = source
        self.health = ServerStatus.UNCHECKED  # OK, ERR or UNCHECKED; see `status`
        self.msg: str | None = None
        self.fail_num = 0  # consecutive failures, requests and checks alike
        self.lastmodified = time.time()
        self.active = 0
        # Smooth WRR state (balancer.smooth_weighted).
        self.current_weight = 0
        self.effective_weight = weight
        # ERR servers are skipped until this monotonic time: INF when an active
        # check failed it (only a check brings it back), finite after passive
        # failures (nginx's fail_timeout: then one request may try it again).
        self.down_until = 0.0
        self.ejection: Ejection | None = None
        self.unstable = False
        self._req_fails = 0
        self._check_fails = 0
        self._check_oks = 0

    @property
    def status(self) -> ServerStatus:
        # Unstable first: protect mode sends it traffic even if it is ejected.
        if self.unstable:
            return ServerStatus.UNSTABLE
        if self.ejection is not None and self.ejection.until > time.time():
            return ServerStatus.EJECTED
        return self.health

    def __repr__(self) -> str:
        return (
            f"<Server {self.address} level={self.level} weight={self.weight} "
            f"status={self.status.value} fail_num={self.fail_num} active={self.active}>"
        )

    def is_ejected(self, wall: float) -> bool:
        return self.ejection is not None and self.ejection.until > wall

    def available(self, now: float, wall: float) -> bool:
        if self.ejection is not None and self.ejection.until > wall:
            return False
        return self.health is not ServerStatus.ERR or now >= self.down_until

    def _set_health(self, health: ServerStatus, msg: str | None) -> None:
        if health is not self.health:
            self.lastmodified = time.time()
        self.health = health
        self.msg = msg

    # -- passive health: what real requests tell us ---------------------------------

    def record_request(self, ok: bool, error: str | None, now: float) -> None:
        if ok:
            self._req_fails = 0
            self.fail_num = 0
            self.unstable = False
            if self.health is ServerStatus.ERR and self.down_until != INF:
                # The retry after fail_timeout worked: back in rotation, shown as
                # it was before (unchecked when no active check ever ran).
                self.down_until = 0.0
                checked = self._check_oks > 0 or self._check_fails > 0
                self._set_health(ServerStatus.OK if checked else ServerStatus.UNCHECKED, None)
            return
        self._req_fails += 1
        self.fail_num += 1
        self.msg = error or "request failed"
        # checkups halves the effective weight on failure; smooth WRR grows it back.
        self.effective_weight //= 2
        if self.max_fails > 0 and self._req_fails >= self.max_fails:
            if self.health is not ServerStatus.ERR:
                self._set_health(ServerStatus.ERR, self.msg)
                # The active check must now see `rise` passes in a row, as after
                # its own failure, before the server is trusted again.
                self._check_oks = 0
            if self.down_until != INF:
                self.down_until = now + self.fail_timeout

    # -- active health: what the checker tells us -----------------------------------

    def record_check(self, ok: bool, msg: str | None, *, rise: int, fall: int) -> bool:
        """Apply one active check result; True when the status changed."""
        before = self.health
        if ok:
            self._check_fails = 0
            self._check_oks += 1
            self.fail_num = 0
            # The first result decides at once: a new server is usable (or not)
            # after one check, not after `rise` intervals.
            if before is ServerStatus.UNCHECKED or (
                before is ServerStatus.ERR and self._check_oks >= rise
            ):
                self._req_fails = 0
                self.down_until = 0.0
                self.unstable = False
                self.effective_weight = self.weight
                self._set_health(ServerStatus.OK, None)
        else:
            self._check_oks = 0
            self._check_fails += 1
            self.fail_num += 1
            self.msg = msg or "check failed"
            if before is ServerStatus.UNCHECKED or self._check_fails >= fall:
                self.down_until = INF
                self._set_health(ServerStatus.ERR, self.msg)
        return self.health is not before

    def reset_checks(self) -> None:
        """Checks were turned off: the server is usable again and shown unchecked."""
        self._check_fails = self._check_oks = 0
        self.down_until = 0.0
        self.unstable = False
        self._set_health(ServerStatus.UNCHECKED, None)


# -- specs: what the store says a cluster is --------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """Active health check of a cluster (the store's "health_check" object)."""

    type: Literal["tcp", "http", "none"] = "tcp"
    path: str = "/"
    host: str | None = None  # Host header for http checks (default: the server address)
    statuses: frozenset[int] = field(default_factory=lambda: frozenset(range(200, 400)))
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True, slots=True)
class ServerSpec:
    host: str
    port: int
    weight: int = 1
    level: int = 1
    max_fails: int | None = None  # None = the gateway's default
    fail_timeout: float | None = None
    source: Literal["static", "catalog"] = "static"

    @property
    def key(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """A cluster's static definition: servers by level and its health check."""

    name: str
    levels: tuple[tuple[ServerSpec, ...], ...] = ()
    check: CheckSpec = CheckSpec()
    protected: bool = True


def _int(doc: Mapping[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{where}{key}: must be an integer from {lo} to {hi}, got {_short(value)}")
    return value


def _float(
    doc: Mapping[str, Any], key: str, where: str, default: float, lo: float, hi: float = 86400.0
) -> float:
    value = doc.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ValueError(
            f"{where}{key}: must be a number from {lo:g} to {hi:g}, got {_short(value)}"
        )
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: must be a JSON object, got {type(value).__name__}")
    return value


def _unknown(doc: Mapping[str, Any], known: Collection[str], where: str) -> None:
    extra = sorted(set(doc) - set(known))
    if extra:
        raise ValueError(f"{where}{extra[0]}: unknown field")


_SERVER_FIELDS: Final = ("host", "port", "weight", "max_fails", "fail_timeout")


def parse_server(doc: Any, where: str, level: int) -> ServerSpec:
    doc = _obj(doc, where.rstrip("."))
    _unknown(doc, _SERVER_FIELDS, where)
    host = doc.get("host")
    if not isinstance(host, str) or not host or len(host) > 253 or any(c in host for c in " /?#@"):
        raise ValueError(f"{where}host: must be a host name or IP address, got {_short(host)}")
    host = host.strip("[]")
    return ServerSpec(
        host=host,
        port=_int(doc, "port", where, -1, 1, 65535),
        weight=_int(doc, "weight", where, 1, 1, 1000),
        level=level,
        max_fails=_int(doc, "max_fails", where, 0, 0, 1000) if "max_fails" in doc else None,
        fail_timeout=(
            _float(doc, "fail_timeout", where, 0.0, 0.0) if "fail_timeout" in doc else None
        ),
    )


def _parse_servers(value: Any, where: str, level: int) -> tuple[ServerSpec, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: must be a list of servers")
    servers = tuple(parse_server(s, f"{where}[{i}].", level) for i, s in enumerate(value))
    seen: set[tuple[str, int]] = set()
    for s in servers:
        if s.key in seen:
            raise ValueError(f"{where}: server {s.host}:{s.port} is listed twice")
        seen.add(s.key)
    return servers


def _parse_statuses(value: Any) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise ValueError('health_check.statuses: must be a non-empty list like [200, "3xx"]')
    codes: set[int] = set()
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and 100 <= item <= 599:
            codes.add(item)
        elif isinstance(item, str) and len(item) == 3 and item[0] in "12345" and item[1:] == "xx":
            base = int(item[0]) * 100
            codes.update(range(base, base + 100))
        else:
            raise ValueError(
                f'health_check.statuses: {_short(item)} is not a status or "2xx" class'
            )
    return frozenset(codes)


_CHECK_FIELDS: Final = ("type", "path", "host", "statuses", "interval", "timeout", "rise", "fall")


def parse_check(doc: Any, defaults: CheckSpec) -> CheckSpec:
    doc = _obj(doc, "health_check")
    _unknown(doc, _CHECK_FIELDS, "health_check.")
    kind = doc.get("type", defaults.type)
    if kind not in ("tcp", "http", "none"):
        raise ValueError(f"health_check.type: must be tcp, http or none, got {_short(kind)}")
    path = doc.get("path", defaults.path)
    # Sent verbatim in the check's request line: printable ASCII without spaces only.
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or not (path.isascii() and path.isprintable())
        or " " in path
    ):
        raise ValueError(f"health_check.path: must be a path starting with '/', got {_short(path)}")
    host = doc.get("host", defaults.host)
    if host is not None and (
        not isinstance(host, str)
        or not host
        or not (host.isascii() and host.isprintable())
        or any(c in host for c in " /")
    ):
        raise ValueError(f"health_check.host: must be a host name, got {_short(host)}")
    w = "health_check."
    return CheckSpec(
        type=kind,
        path=path,
        host=host,
        statuses=_parse_statuses(doc["statuses"]) if "statuses" in doc else defaults.statuses,
        interval=_float(doc, "interval", w, defaults.interval, 0.05, 3600.0),
        timeout=_float(doc, "timeout", w, defaults.timeout, 0.01, 600.0),
        rise=_int(doc, "rise", w, defaults.rise, 1, 100),
        fall=_int(doc, "fall", w, defaults.fall, 1, 100),
    )


def parse_upstream(name: str, doc: Any, defaults: CheckSpec = CheckSpec()) -> UpstreamSpec:
    """Parse Slardar's upstream bodies; ValueError naming the field.

    ``{"servers": [...]}`` is level 1 only; ``{"cluster": [{"servers": [...]}, ...]}``
    gives every level in order. Both may carry ``"health_check"`` and ``"protected"``;
    a body with neither list sets only those (e.g. the check of a catalog service).
    Slardar's ``"enable"`` is accepted and ignored.
    """
    from berth.gateway.routes import NAME_RE

    if not NAME_RE.match(name):
        raise ValueError(f"name: {_short(name)} must match [-_a-zA-Z0-9.]+")
    doc = _obj(doc, "body")
    _unknown(doc, ("servers", "cluster", "health_check", "protected", "enable"), "")
    if "servers" in doc and "cluster" in doc:
        raise ValueError("servers: give either servers (level 1) or cluster (all levels)")
    levels: tuple[tuple[ServerSpec, ...], ...] = ()
    if "servers" in doc:
        levels = (_parse_servers(doc["servers"], "servers", 1),)
    elif "cluster" in doc:
        cluster = doc["cluster"]
        if not isinstance(cluster, list):
            raise ValueError('cluster: must be a list of levels [{"servers": [...]}, ...]')
        parsed = []
        for i, level in enumerate(cluster):
            level_doc = _obj(level, f"cluster[{i}]")
            _unknown(level_doc, ("servers",), f"cluster[{i}].")
            parsed.append(_parse_servers(level_doc.get("servers"), f"cluster[{i}].servers", i + 1))
        levels = tuple(parsed)
        seen: set[tuple[str, int]] = set()
        for servers in levels:
            for s in servers:
                if s.key in seen:
                    raise ValueError(f"cluster: server {s.host}:{s.port} is in two levels")
                seen.add(s.key)
    check = parse_check(doc["health_check"], defaults) if "health_check" in doc else defaults
    protected = doc.get("protected", True)
    if not isinstance(protected, bool):
        raise ValueError(f"protected: must be true or false, got {_short(protected)}")
    return UpstreamSpec(name=name, levels=levels, check=check, protected=protected)


def check_to_json(check: CheckSpec) -> dict[str, Any]:
    return {
        "type": check.type,
        "path": check.path,
        "host": check.host,
        "statuses": sorted(check.statuses),
        "interval": check.interval,
        "timeout": check.timeout,
        "rise": check.rise,
        "fall": check.fall,
    }


# -- the cluster --------------------------------------------------------------------------


class Cluster:
    """The servers of one cluster by level, and the pick/feedback calls the proxy makes."""

    __slots__ = ("_rings", "check", "levels", "name", "protected", "servers")

    def __init__(
        self,
        name: str,
        servers: Iterable[Server],
        *,
        check: CheckSpec | None = None,
        protected: bool = True,
    ) -> None:
        self.name = name
        self.servers = tuple(servers)
        self.check = check or CheckSpec(type="none")
        self.protected = protected
        by_level: dict[int, list[Server]] = {}
        for server in self.servers:
            by_level.setdefault(server.level, []).append(server)
        self.levels = tuple(tuple(by_level[lv]) for lv in sorted(by_level))
        self._rings: dict[int, balancer.HashRing] = {}

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for s in self.servers:
            counts[s.status.value] = counts.get(s.status.value, 0) + 1
        shown = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        return (
            f"<Cluster {self.name} levels={len(self.levels)} servers={len(self.servers)} {shown}>"
        )

    def server(self, address: str) -> Server | None:
        for s in self.servers:
            if s.address == address:
                return s
        return None

    def pick(
        self, route: Route, hash_key: bytes | None, exclude: Collection[Server] = ()
    ) -> Server | None:
        """Choose a server: the first level with an available server, by the route's policy;
        protect mode returns the least-bad server when none is available anywhere;
        None only when the cluster has no servers (or all are excluded)."""
        # Clocks are read only when a server is ejected or down: the common
        # request reads none.
        now = wall = -1.0
        err = ServerStatus.ERR
        for index, level in enumerate(self.levels):
            # Server.available, inlined: this runs for every server on every request.
            candidates: list[Server] = []
            for s in level:
                if s.ejection is not None:
                    if wall < 0:
                        wall = time.time()
                    if s.ejection.until > wall:
                        continue
                if s.health is err:
                    if now < 0:
                        now = time.monotonic()
                    if now < s.down_until:
                        continue
                if s not in exclude:
                    candidates.append(s)
            if not candidates:
                continue
            if route.lb == "hash" and hash_key is not None:
                ring = self._rings.get(index)
                if ring is None:
                    ring = self._rings[index] = balancer.HashRing(level)
                chosen = ring.lookup(hash_key, candidates.__contains__)
                if chosen is not None:
                    return chosen
            if route.lb == "least_conn":
                return balancer.least_conn(candidates)
            return balancer.smooth_weighted(candidates)
        if not self.protected:
            return None
        return self.least_bad(exclude, now if now >= 0 else None, wall if wall >= 0 else None)

    def least_bad(
        self, exclude: Collection[Server] = (), now: float | None = None, wall: float | None = None
    ) -> Server | None:
        """Protect mode: every server is down, so keep trying the one most likely to work
        (not ejected, failed passively rather than by check, fewest failures, lowest
        level) and show it ``unstable``, as checkups does."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        best: Server | None = None
        best_key: tuple[bool, bool, float, int, int] | None = None
        for server in self.servers:
            if server in exclude:
                continue
            key = (
                server.is_ejected(wall),
                server.down_until == INF,
                server.down_until,
                server.fail_num,
                server.level,
            )
            if best_key is None or key < best_key:
                best, best_key = server, key
        if best is not None:
            best.unstable = True
            if not exclude:
                # One server is the protected one; an earlier choice that is no
                # longer the least bad goes back to showing its own status.
                for server in self.servers:
                    if server is not best:
                        server.unstable = False
        return best

    def has_available(self) -> bool:
        now, wall = time.monotonic(), time.time()
        return any(s.available(now, wall) for s in self.servers)

    def on_request_start(self, server: Server) -> None:
        server.active += 1

    def on_request_end(self, server: Server, ok: bool, error: str | None) -> None:
        if server.active > 0:
            server.active -= 1
        # The clock dates a failure's fail_timeout; a success needs none.
        server.record_request(ok, error, 0.0 if ok else time.monotonic())


def server_from_spec(
    spec: ServerSpec, previous: Server | None, *, max_fails: int, fail_timeout: float
) -> Server:
    """Reuse the previous Server object (its health survives) and update its config."""
    server = previous or Server(spec.host, spec.port, source=spec.source)
    if server.weight != spec.weight:
        server.weight = spec.weight
        server.effective_weight = min(server.effective_weight, spec.weight) or spec.weight
        server.current_weight = 0
    server.level = spec.level
    server.source = spec.source
    server.max_fails = max_fails if spec.max_fails is None else spec.max_fails
    server.fail_timeout = fail_timeout if spec.fail_timeout is None else spec.fail_timeout
    return server


def build_cluster(
    spec: UpstreamSpec,
    previous: Mapping[tuple[str, int], Server],
    *,
    max_fails: int,
    fail_timeout: float,
) -> Cluster:
    servers: list[Server] = []
    for level in spec.levels:
        for s in level:
            servers.append(
                server_from_spec(
                    s, previous.get(s.key), max_fails=max_fails, fail_timeout=fail_timeout
                )
            )
    return Cluster(spec.name, servers, check=spec.check, protected=spec.protected)


def servers_by_key(cluster: Cluster | None) -> dict[tuple[str, int], Server]:
    return {} if cluster is None else {(s.host, s.port): s for s in cluster.servers}


def merge_levels(
    static: Sequence[Sequence[ServerSpec]], catalog: Sequence[ServerSpec]
) -> tuple[tuple[ServerSpec, ...], ...]:
    """Catalog instances join level 1; a static entry for the same address wins."""
    static_keys = {s.key for level in static for s in level}
    extra = tuple(s for s in catalog if s.key not in static_keys)
    if not static:
        return (extra,) if extra else ()
    first = tuple(static[0]) + extra
    return (first, *(tuple(level) for level in static[1:]))
