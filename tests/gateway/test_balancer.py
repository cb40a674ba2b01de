from __future__ import annotations

import asyncio
import collections
from typing import Any

import httpx

from berth.gateway.balancer import HashRing, hash_key, least_conn, smooth_weighted
from berth.gateway.cluster import Cluster, Server, ServerStatus
from berth.gateway.routes import Route, RoutingTable

RR = Route(host="h", path_prefix="/", cluster="c")
LC = Route(host="h", path_prefix="/", cluster="c", lb="least_conn")
HASH = Route(host="h", path_prefix="/", cluster="c", lb="hash")


def servers(*weights: int, level: int = 1, base: int = 1) -> list[Server]:
    return [Server(f"10.0.0.{base + i}", 80, w, level) for i, w in enumerate(weights)]


def test_smooth_wrr_sequence_is_nginx() -> None:
    # nginx's documented example: weights 5,1,1 give a a b a c a a (no bursts of 5).
    a, b, c = servers(5, 1, 1)
    picks = [smooth_weighted([a, b, c]).host[-1] for _ in range(7)]
    assert picks == ["1", "1", "2", "1", "3", "1", "1"]


def test_smooth_wrr_distribution() -> None:
    pool = servers(3, 2, 1)
    counts = collections.Counter(smooth_weighted(pool).address for _ in range(6000))
    assert [counts[s.address] for s in pool] == [3000, 2000, 1000]


def test_failure_halves_effective_weight_and_it_recovers() -> None:
    a, b = servers(4, 4)
    cluster = Cluster("c", [a, b])
    a.max_fails = 0
    cluster.on_request_start(a)
    cluster.on_request_end(a, False, "connection refused")
    assert a.effective_weight == 2
    assert cluster.pick(RR, None) is b  # the failed server lost its turn
    for _ in range(8):
        cluster.pick(RR, None)
    assert a.effective_weight == 4  # grown back one per round
    later = collections.Counter(cluster.pick(RR, None).address for _ in range(800))  # type: ignore[union-attr]
    assert abs(later[a.address] - later[b.address]) <= 2


def test_least_conn_prefers_fewest_per_weight_and_ties_round_robin() -> None:
    a, b, c = servers(1, 2, 1)
    a.active, b.active, c.active = 2, 2, 5
    assert least_conn([a, b, c]) is b  # 2/2 < 2/1
    a.active = b.active = c.active = 0
    counts = collections.Counter(least_conn([a, b, c]).address for _ in range(400))
    assert [counts[s.address] for s in (a, b, c)] == [100, 200, 100]


def test_least_conn_distribution_under_load() -> None:
    pool = servers(1, 1, 1)
    cluster = Cluster("c", pool)
    slow = pool[0]
    in_flight: list[Server] = []
    for _ in range(300):
        s = cluster.pick(LC, None)
        assert s is not None
        cluster.on_request_start(s)
        in_flight.append(s)
        # Every server but the slow one finishes its requests at once.
        for t in [t for t in in_flight if t is not slow]:
            cluster.on_request_end(t, True, None)
            in_flight.remove(t)
    assert slow.active == 1  # it got one request, then never again while busy
    assert pool[1].active == pool[2].active == 0


def keys(n: int) -> list[bytes]:
    return [b"/img/%d.jpg" % i for i in range(n)]


def test_hash_ring_is_stable_and_balanced() -> None:
    pool = servers(*([1] * 10))
    ring = HashRing(pool)
    assert repr(ring) == "<HashRing servers=10 points=1600>"
    owners = {k: ring.lookup(k, lambda s: True) for k in keys(20000)}
    counts = collections.Counter(s.address for s in owners.values() if s)
    assert len(counts) == 10
    assert max(counts.values()) < 1.3 * 2000 and min(counts.values()) > 0.7 * 2000
    # Same servers in another order: the same ring.
    assert all(
        HashRing(list(reversed(pool))).lookup(k, lambda s: True) is owners[k] for k in keys(500)
    )


def test_hash_ring_remaps_about_one_nth_when_a_server_is_added() -> None:
    pool = servers(*([1] * 10))
    before = HashRing(pool)
    new = Server("10.0.0.99", 80)
    after = HashRing([*pool, new])
    moved = 0
    for k in keys(20000):
        old, now = before.lookup(k, lambda s: True), after.lookup(k, lambda s: True)
        if old is not now:
            moved += 1
            assert now is new  # keys only move to the new server
    assert 0.05 < moved / 20000 < 0.14  # ideal 1/11 = 0.091


def test_hash_ring_remaps_only_the_removed_servers_keys() -> None:
    pool = servers(*([1] * 10))
    ring = HashRing(pool)
    gone = pool[3]
    moved = 0
    for k in keys(20000):
        old = ring.lookup(k, lambda s: True)
        now = ring.lookup(k, lambda s: s is not gone)
        if old is not now:
            moved += 1
            assert old is gone
    assert 0.05 < moved / 20000 < 0.15  # ideal 1/10


def test_hash_ring_weights() -> None:
    pool = servers(1, 3)
    ring = HashRing(pool)
    counts = collections.Counter(ring.lookup(k, lambda s: True).address for k in keys(20000))  # type: ignore[union-attr]
    share = counts[pool[1].address] / 20000
    assert 0.65 < share < 0.85


def test_cluster_hash_pick_is_sticky_and_falls_back_without_key() -> None:
    pool = servers(1, 1, 1, 1)
    cluster = Cluster("c", pool)
    for k in keys(50):
        assert cluster.pick(HASH, k) is cluster.pick(HASH, k)
    counts = collections.Counter(cluster.pick(HASH, None).address for _ in range(400))  # type: ignore[union-attr]
    assert set(counts.values()) == {100}
    # A key whose server is excluded (already tried) moves to another server.
    k = b"/x"
    first = cluster.pick(HASH, k)
    assert first is not None
    second = cluster.pick(HASH, k, exclude=[first])
    assert second is not None and second is not first


def test_hash_key_sources() -> None:
    assert hash_key(HASH, b"/a?b", "1.2.3.4", None) == b"/a?b"
    ip = Route(host="h", path_prefix="/", cluster="c", lb="hash", hash_on="ip")
    assert hash_key(ip, b"/a", "1.2.3.4", None) == b"1.2.3.4"
    hdr = Route(host="h", path_prefix="/", cluster="c", lb="hash", hash_on="header")
    assert hash_key(hdr, b"/a", "1.2.3.4", b"user-7") == b"user-7"
    assert hash_key(hdr, b"/a", "1.2.3.4", None) is None


def test_levels_next_only_when_current_has_none() -> None:
    primary = servers(1, 1)
    backup = servers(1, level=2, base=10)
    cluster = Cluster("c", [*backup, *primary])
    assert [len(lv) for lv in cluster.levels] == [2, 1]
    picks = {cluster.pick(RR, None).address for _ in range(10)}  # type: ignore[union-attr]
    assert picks == {s.address for s in primary}
    primary[0].record_check(False, "connection refused", rise=1, fall=1)
    assert {cluster.pick(RR, None).address for _ in range(10)} == {primary[1].address}  # type: ignore[union-attr]
    primary[1].record_check(False, "connection refused", rise=1, fall=1)
    assert cluster.pick(RR, None) is backup[0]
    # Excluding the backup (already tried) with the primaries down: protect mode.
    chosen = cluster.pick(RR, None, exclude=backup)
    assert chosen in primary and chosen.status is ServerStatus.UNSTABLE


def test_protect_mode_picks_least_bad_and_shows_unstable() -> None:
    a, b, c = servers(1, 1, 1)
    cluster = Cluster("c", [a, b, c])
    a.record_check(False, "connection refused", rise=1, fall=1)  # failed by check
    b.max_fails = 1
    cluster.on_request_start(b)
    cluster.on_request_end(b, False, "read timeout")  # failed passively, resting
    c.max_fails = 1
    for _ in range(3):
        cluster.on_request_start(c)
        cluster.on_request_end(c, False, "502 Bad Gateway")
    assert not cluster.has_available()
    chosen = cluster.pick(RR, None)
    assert chosen is b  # passive failure ending soonest beats a failed check
    assert b.status is ServerStatus.UNSTABLE and a.status is ServerStatus.ERR
    cluster.on_request_start(b)
    cluster.on_request_end(b, True, None)
    assert b.status is ServerStatus.UNCHECKED and cluster.has_available()


def test_unprotected_cluster_returns_none() -> None:
    (a,) = servers(1)
    cluster = Cluster("c", [a], protected=False)
    a.record_check(False, "refused", rise=1, fall=1)
    assert cluster.pick(RR, None) is None


def test_empty_or_all_excluded() -> None:
    assert Cluster("c", ()).pick(RR, None) is None
    pool = servers(1, 1)
    assert Cluster("c", pool).pick(RR, None, exclude=pool) is None


# -- through the real gateway: distributions as clients see them -----------------------------


def table_of(route: Route, servers: list[Server]) -> RoutingTable:
    return RoutingTable([route], {route.cluster: Cluster(route.cluster, servers)})


async def served_by(client: httpx.AsyncClient, host: str, path: str = "/", **headers: str) -> str:
    resp = await client.get(path, headers={"Host": host, **headers})
    assert resp.status_code == 200, resp.text
    return str(resp.headers["x-upstream"])


async def test_gateway_weighted_round_robin(make_gateway: Any, upstreams: Any) -> None:
    a, b = await upstreams("a"), await upstreams("b")
    gw = await make_gateway()
    route = Route("rr.test", "/", "rr")
    gw.routes.table = table_of(
        route, [Server("127.0.0.1", a.port, 3), Server("127.0.0.1", b.port, 1)]
    )
    async with httpx.AsyncClient(base_url=gw.url) as client:
        seen = collections.Counter([await served_by(client, "rr.test") for _ in range(40)])
    assert seen == {"a": 30, "b": 10}


async def test_gateway_least_conn_avoids_the_busy_server(make_gateway: Any, upstreams: Any) -> None:
    a, b = await upstreams("a"), await upstreams("b")
    gw = await make_gateway()
    route = Route("lc.test", "/", "lc", lb="least_conn")
    gw.routes.table = table_of(route, [Server("127.0.0.1", a.port), Server("127.0.0.1", b.port)])
    async with httpx.AsyncClient(base_url=gw.url) as client:
        held = asyncio.create_task(client.get("/hold", headers={"Host": "lc.test"}))
        arrivals = [asyncio.create_task(u.app.arrived.wait()) for u in (a, b)]
        await asyncio.wait(arrivals, return_when=asyncio.FIRST_COMPLETED)
        for task in arrivals:
            task.cancel()
        busy = "a" if a.app.requests else "b"
        seen = collections.Counter([await served_by(client, "lc.test") for _ in range(20)])
        assert busy not in seen and sum(seen.values()) == 20
        a.app.hold.set()
        b.app.hold.set()
        assert (await held).status_code == 200


async def test_gateway_consistent_hash_by_header(make_gateway: Any, upstreams: Any) -> None:
    ups = [await upstreams(name) for name in ("a", "b", "c")]
    gw = await make_gateway()
    route = Route("hash.test", "/", "h", lb="hash", hash_on="header", hash_header="x-user")
    gw.routes.table = table_of(route, [Server("127.0.0.1", u.port) for u in ups])
    async with httpx.AsyncClient(base_url=gw.url) as client:
        first = {u: await served_by(client, "hash.test", **{"X-User": f"u{u}"}) for u in range(30)}
        again = {u: await served_by(client, "hash.test", **{"X-User": f"u{u}"}) for u in range(30)}
        by_uri = {await served_by(client, "hash.test", "/same/path") for _ in range(6)}
    assert first == again
    assert set(first.values()) == {"a", "b", "c"}
    # No X-User header: round-robin over all servers instead.
    assert len(by_uri) == 3


async def test_gateway_backup_level_only_when_primary_is_down(
    make_gateway: Any, upstreams: Any
) -> None:
    a, backup = await upstreams("a"), await upstreams("backup")
    gw = await make_gateway()
    primary = Server("127.0.0.1", a.port, max_fails=1, fail_timeout=60)
    route = Route("lv.test", "/", "lv")
    gw.routes.table = table_of(route, [primary, Server("127.0.0.1", backup.port, level=2)])
    async with httpx.AsyncClient(base_url=gw.url) as client:
        assert {await served_by(client, "lv.test") for _ in range(10)} == {"a"}
        await a.stop()
        # The first request fails over within its tries; from then on the primary is out.
        assert {await served_by(client, "lv.test") for _ in range(10)} == {"backup"}
    assert primary.status is ServerStatus.ERR and primary.msg
