"""Discovery: watch the store and keep an immutable routing table current.

Three kinds of watch, all Consul blocking queries through StoreClient:
one recursive KV watch on ``berth/gateway/`` (routes, static upstreams,
ejections), one on the catalog's service list, and one per service on its
passing instances. Every change rebuilds the table from the last good value
of every key and swaps it in with one assignment; the proxy reads
``discovery.table`` once per request, so a request never sees half a change.
Server objects are carried from the old table to the new one, so health
state survives every swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from berth.gateway.cluster import (
    CheckSpec,
    Cluster,
    Ejection,
    ServerSpec,
    UpstreamSpec,
    build_cluster,
    merge_levels,
    parse_upstream,
    servers_by_key,
)
from berth.gateway.config import GatewayConfig
from berth.gateway.health import HealthChecker
from berth.gateway.routes import NAME_RE, Route, RoutingTable, parse_route
from berth.store.client import (
    Backoff,
    KVEntry,
    ServiceInstance,
    StoreClient,
    WatchRateLimiter,
    next_index,
)
from berth.store.errors import StoreError

log = logging.getLogger("berth.gateway.discovery")

PREFIX = "berth/gateway/"
ROUTES = PREFIX + "routes/"
UPSTREAMS = PREFIX + "upstreams/"
EJECTIONS = PREFIX + "ejections/"

# How long start() waits for the first full view before serving with what it has.
START_TIMEOUT = 10.0
RETRY_MAX_DELAY = 2.0
FRESH_STORE_WAIT = "1s"


# -- pure parts: store entries -> view -> table ---------------------------------------------


@dataclass(frozen=True, slots=True)
class StoreView:
    """Everything discovery knows, each key at its last good value."""

    routes: Mapping[str, tuple[Route, ...]] = field(default_factory=dict)  # by store key
    upstreams: Mapping[str, UpstreamSpec] = field(default_factory=dict)  # by cluster name
    ejections: Mapping[tuple[str, str], Ejection] = field(default_factory=dict)
    services: Mapping[str, tuple[ServerSpec, ...]] = field(default_factory=dict)


def parse_routes_value(host: str, doc: Any) -> tuple[Route, ...]:
    """A route key holds one route object, or a list of them (one per path prefix)."""
    if isinstance(doc, list):
        if not doc:
            raise ValueError("route: an empty list routes nothing")
        routes = []
        for i, item in enumerate(doc):
            try:
                routes.append(parse_route(host, item))
            except ValueError as exc:
                raise ValueError(f"[{i}].{exc}") from None
        prefixes = [r.path_prefix for r in routes]
        if len(set(prefixes)) != len(prefixes):
            raise ValueError("path_prefix: the same prefix is listed twice")
        return tuple(routes)
    return (parse_route(host, doc),)


def parse_ejection(doc: Any) -> Ejection:
    if not isinstance(doc, Mapping):
        raise ValueError("ejection: must be a JSON object")
    until = doc.get("until")
    if isinstance(until, bool) or not isinstance(until, int | float):
        raise ValueError(f"until: must be epoch seconds, got {type(until).__name__}")
    by, reason = doc.get("by", ""), doc.get("reason", "")
    if not isinstance(by, str) or not isinstance(reason, str):
        raise ValueError("by/reason: must be strings")
    return Ejection(by=by, reason=reason, until=float(until))


def parse_entry(key: str, value: bytes, defaults: CheckSpec) -> tuple[str, Any]:
    """One KV entry -> (kind, parsed); ValueError when the value is bad, KeyError if not ours."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    if key.startswith(ROUTES):
        return "route", parse_routes_value(key[len(ROUTES) :], doc)
    if key.startswith(UPSTREAMS):
        return "upstream", parse_upstream(key[len(UPSTREAMS) :], doc, defaults)
    if key.startswith(EJECTIONS):
        cluster, _, address = key[len(EJECTIONS) :].partition("/")
        if not cluster or not address:
            raise ValueError("key must be berth/gateway/ejections/<cluster>/<host:port>")
        return "ejection", ((cluster, address), parse_ejection(doc))
    raise KeyError(key)


def instance_spec(inst: ServiceInstance) -> ServerSpec | None:
    if not inst.address or not 0 < inst.port < 65536:
        return None
    weight, level = 1, 1
    with contextlib.suppress(ValueError):
        weight = min(1000, max(1, int(inst.meta.get("weight", 1))))
    with contextlib.suppress(ValueError):
        level = min(100, max(1, int(inst.meta.get("level", 1))))
    return ServerSpec(inst.address, inst.port, weight, level, source="catalog")


def build_table(
    view: StoreView,
    previous: RoutingTable,
    *,
    default_check: CheckSpec,
    max_fails: int,
    fail_timeout: float,
    version: int,
) -> RoutingTable:
    """The routing table for ``view``, reusing ``previous``'s Server objects."""
    names = set(view.upstreams) | set(view.services)
    clusters: dict[str, Cluster] = {}
    for name in sorted(names):
        static = view.upstreams.get(name) or UpstreamSpec(name, (), default_check)
        catalog = view.services.get(name, ())
        # Catalog instances carry a level in their meta; static levels come first.
        by_level: dict[int, list[ServerSpec]] = {}
        for s in catalog:
            by_level.setdefault(s.level, []).append(s)
        levels = list(merge_levels(static.levels, by_level.pop(1, [])))
        for lv in sorted(by_level):
            known = {s.key for level in levels for s in level}
            extra = tuple(
                ServerSpec(s.host, s.port, s.weight, lv, source="catalog")
                for s in by_level[lv]
                if s.key not in known
            )
            while len(levels) < lv - 1:
                levels.append(())
            if len(levels) >= lv:
                levels[lv - 1] = (*levels[lv - 1], *extra)
            else:
                levels.append(extra)
        # Every server's level follows its position, whatever its spec said.
        levels_fixed = tuple(
            tuple(
                ServerSpec(s.host, s.port, s.weight, i + 1, s.max_fails, s.fail_timeout, s.source)
                for s in level
            )
            for i, level in enumerate(levels)
            if level
        )
        spec = UpstreamSpec(name, levels_fixed, static.check, static.protected)
        cluster = build_cluster(
            spec,
            servers_by_key(previous.clusters.get(name)),
            max_fails=max_fails,
            fail_timeout=fail_timeout,
        )
        for server in cluster.servers:
            server.ejection = view.ejections.get((name, server.address)) or view.ejections.get(
                (name, f"{server.host}:{server.port}")
            )
        clusters[name] = cluster
    routes = [r for key in sorted(view.routes) for r in view.routes[key]]
    return RoutingTable(routes, clusters, version=version)


# -- the watcher -------------------------------------------------------------------------------


class Discovery:
    def __init__(
        self, store: StoreClient, config: GatewayConfig, *, wait: str | None = None
    ) -> None:
        self.store = store
        self.config = config
        self.wait = wait or f"{config.discovery_wait:g}s"
        self.table = RoutingTable()
        self.ready = asyncio.Event()
        self.health = HealthChecker(on_change=self._changed)
        self.default_check = CheckSpec(
            type=config.health_type,
            path=config.health_path,
            interval=config.health_interval,
            timeout=config.health_timeout,
            rise=config.health_rise,
            fall=config.health_fall,
        )
        self.started_at = time.time()
        self.store_error: str | None = None  # the last failure talking to the store
        self.last_change = 0.0  # epoch of the last table swap
        # key -> (ModifyIndex, kind, parsed) of the last good value.
        self._kv: dict[str, tuple[int, str, Any]] = {}
        self._bad: dict[str, tuple[int, str]] = {}  # key -> (ModifyIndex, error) of bad values
        self._raw: dict[str, bytes] = {}
        self._services: dict[str, tuple[ServerSpec, ...]] = {}
        self._service_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._kv_loaded = False
        self._catalog: set[str] | None = None
        self._attempted = asyncio.Event()  # the first KV read finished, well or not
        self._swapped = asyncio.Condition()
        self._rebuild_pending = False
        self._version = 0
        self._notifiers: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"<Discovery ready={self.ready.is_set()} table=v{self.table.version} "
            f"clusters={len(self.table.clusters)} routes={len(self.table.routes)} "
            f"services={len(self._services)} store_error={self.store_error is not None}>"
        )

    @property
    def bad_keys(self) -> dict[str, str]:
        """Keys whose current value is rejected (the last good value is still used)."""
        return {k: err for k, (_, err) in self._bad.items()}

    def raw_value(self, key: str) -> bytes | None:
        """The last good raw value of a ``berth/gateway/`` key, as discovery applied it."""
        return self._raw.get(key)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._guard(self._watch_kv, "kv"), name="discovery:kv"),
            asyncio.create_task(
                self._guard(self._watch_catalog, "catalog"), name="discovery:catalog"
            ),
        ]
        # Serve as soon as the store answered with everything, or as soon as it is
        # known to be down (then with an empty table; the watches keep retrying).
        waiters = [
            asyncio.create_task(self.ready.wait()),
            asyncio.create_task(self._store_down()),
        ]
        try:
            await asyncio.wait(waiters, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if not self.ready.is_set():
            log.warning(
                "store at %s not ready (%s); serving an empty table until it is",
                self.store.url,
                self.store_error or "no answer yet",
            )

    async def _store_down(self) -> None:
        await self._attempted.wait()
        if self.store_error is None:
            await asyncio.Event().wait()  # the store answered: only `ready` ends start()

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._service_tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._service_tasks.clear()
        await self.health.stop()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds, re-checked after every table swap, change
        of ``bad_keys``, health-check status change or loss of the store; False on
        timeout."""
        try:
            async with asyncio.timeout(timeout), self._swapped:
                await self._swapped.wait_for(predicate)
                return True
        except TimeoutError:
            return predicate()

    # -- watch loops ------------------------------------------------------------------------

    async def _guard(self, loop: Callable[[], Any], what: str) -> None:
        # The loops handle store errors themselves; this only keeps a bug from
        # silently ending discovery.
        backoff = Backoff(RETRY_MAX_DELAY)
        while True:
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("discovery %s watch failed; restarting it", what)
                await asyncio.sleep(backoff.next())

    async def _blocking(
        self, query: Callable[[int, str], Any], on_result: Callable[[Any], None], what: str
    ) -> None:
        index = 0
        limiter = WatchRateLimiter()
        backoff = Backoff(RETRY_MAX_DELAY)
        while True:
            if (delay := limiter.delay()) > 0:
                await asyncio.sleep(delay)
            try:
                # Index 1 is what a never-written store reports; a store that also
                # numbers its first write 1 (berth's embedded one did) would hold a
                # long wait through that write, so on index 1 poll briefly instead.
                wait = self.wait if index > 1 else FRESH_STORE_WAIT
                returned, result = await query(index, wait)
            except (StoreError, httpx.HTTPError, ValueError) as exc:
                if self.store_error is None:
                    self._changed()
                self.store_error = f"{what}: {exc}"
                if what == "kv":
                    self._attempted.set()
                log.warning("discovery: %s watch failed (%s); retrying", what, exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            if self.store_error is not None and self.store_error.startswith(what + ":"):
                self.store_error = None
            index = next_index(index, returned)
            on_result(result)

    async def _watch_kv(self) -> None:
        async def query(index: int, wait: str) -> tuple[int, list[KVEntry]]:
            return await self.store.kv_list(PREFIX, index=index, wait=wait)

        await self._blocking(query, self._apply_kv, "kv")

    async def _watch_catalog(self) -> None:
        async def query(index: int, wait: str) -> tuple[int, dict[str, list[str]]]:
            return await self.store.catalog_services(index=index, wait=wait)

        await self._blocking(query, self._apply_catalog, "catalog")

    async def _watch_service(self, name: str) -> None:
        async def query(index: int, wait: str) -> tuple[int, list[ServiceInstance]]:
            return await self.store.health_service(name, passing=True, index=index, wait=wait)

        await self._blocking(query, lambda found: self._apply_service(name, found), "svc " + name)

    # -- applying results -------------------------------------------------------------------

    def _apply_kv(self, entries: list[KVEntry]) -> None:
        seen: set[str] = set()
        changed = False
        bad_before = dict(self._bad)
        for entry in entries:
            key = entry.key
            if entry.value is None or key.endswith("/"):
                continue  # folder markers
            seen.add(key)
            old = self._kv.get(key)
            if (old is not None and old[0] == entry.modify_index) or (
                self._bad.get(key, (None,))[0] == entry.modify_index
            ):
                continue
            try:
                kind, parsed = parse_entry(key, entry.value, self.default_check)
            except KeyError:
                continue  # a key under berth/gateway/ that is not ours
            except ValueError as exc:
                # Keep the last good value of this key; say so once per bad write.
                self._bad[key] = (entry.modify_index, str(exc))
                log.error(
                    "store key %s: %s; keeping its last good value%s",
                    key,
                    exc,
                    "" if old else " (none yet, key ignored)",
                )
                continue
            self._bad.pop(key, None)
            self._kv[key] = (entry.modify_index, kind, parsed)
            self._raw[key] = entry.value
            changed = True
        for key in [k for k in self._kv if k not in seen]:
            del self._kv[key]
            self._raw.pop(key, None)
            changed = True
        for key in [k for k in self._bad if k not in seen]:
            del self._bad[key]
        if self._bad != bad_before:
            self._changed()
        if not self._kv_loaded:
            self._kv_loaded = True
            changed = True
        self._attempted.set()
        if changed:
            self._schedule_rebuild()

    def _apply_catalog(self, services: dict[str, list[str]]) -> None:
        names = {n for n in services if NAME_RE.match(n)}
        for name in names - set(self._service_tasks):
            self._service_tasks[name] = asyncio.create_task(
                self._guard(functools.partial(self._watch_service, name), "svc " + name),
                name=f"discovery:svc:{name}",
            )
        removed = set(self._service_tasks) - names
        for name in removed:
            self._service_tasks.pop(name).cancel()
            self._services.pop(name, None)
        first = self._catalog is None
        self._catalog = names
        if removed or first:
            self._schedule_rebuild()

    def _apply_service(self, name: str, found: list[ServiceInstance]) -> None:
        if self._catalog is not None and name not in self._catalog:
            return
        specs: dict[tuple[str, int], ServerSpec] = {}
        for inst in found:
            spec = instance_spec(inst)
            if spec is not None:
                specs.setdefault(spec.key, spec)
        servers = tuple(specs.values())
        if self._services.get(name) != servers:
            self._services[name] = servers
            self._schedule_rebuild()

    def _complete(self) -> bool:
        return (
            self._kv_loaded
            and self._catalog is not None
            and all(n in self._services for n in self._catalog)
        )

    def _schedule_rebuild(self) -> None:
        # Coalesce a burst of watch results (start-up, a deploy) into one swap.
        if not self._rebuild_pending:
            self._rebuild_pending = True
            asyncio.get_running_loop().call_soon(self._rebuild)

    def view(self) -> StoreView:
        routes: dict[str, tuple[Route, ...]] = {}
        upstreams: dict[str, UpstreamSpec] = {}
        ejections: dict[tuple[str, str], Ejection] = {}
        for key, (_, kind, parsed) in self._kv.items():
            if kind == "route":
                routes[key] = parsed
            elif kind == "upstream":
                upstreams[parsed.name] = parsed
            else:
                ejections[parsed[0]] = parsed[1]
        return StoreView(routes, upstreams, ejections, dict(self._services))

    def _rebuild(self) -> None:
        self._rebuild_pending = False
        self._version += 1
        try:
            table = build_table(
                self.view(),
                self.table,
                default_check=self.default_check,
                max_fails=self.config.max_fails,
                fail_timeout=self.config.fail_timeout,
                version=self._version,
            )
        except Exception:
            log.exception("could not build a routing table; keeping the current one")
            return
        self.table = table
        self.last_change = time.time()
        self.health.update(table)
        log.debug("routing table v%d: %r", table.version, table)
        if not self.ready.is_set() and self._complete():
            self.ready.set()
            log.info("routing table ready: %r", table)
        self._changed()

    def _changed(self) -> None:
        task = asyncio.get_running_loop().create_task(self._notify())
        self._notifiers.add(task)
        task.add_done_callback(self._notifiers.discard)

    async def _notify(self) -> None:
        async with self._swapped:
            self._swapped.notify_all()
