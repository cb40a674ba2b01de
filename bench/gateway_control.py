"""Gateway control benchmark: how fast changes reach traffic, and what a pick costs.

    .venv/bin/python bench/gateway_control.py [--changes 60]

Anchors (Slardar + lua-resty-checkups, ../shared/reference/gateway-anchors.md):
- a dynamic upstream update reaches every worker on the next shared-dict sync,
  ``shd_config_timer_interval`` = 1 s: 0.5 s on average, 1 s at worst;
- a new server is first health-checked on the next heartbeat, every
  ``checkup_timer_interval`` = 5 s: 2.5 s on average, 5 s at worst;
- the issue's target: a store change reaches traffic in under one second.
berth measures the same events in one run: a real control plane on loopback
(port 0, temporary data dir), a real Discovery watching it over HTTP, and real
TCP servers to check. Ratios below 1 beat the anchor. Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import time
import timeit
from pathlib import Path

from berth.controlplane.config import ControlPlaneConfig
from berth.controlplane.server import ControlPlaneServer
from berth.gateway.cluster import Cluster, Server, ServerStatus
from berth.gateway.config import GatewayConfig
from berth.gateway.discovery import Discovery
from berth.gateway.routes import Route, RoutingTable
from berth.store.client import StoreClient

SLARDAR_SYNC = 1.0
CHECKUPS_INTERVAL = 5.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(label: str, values: list[float], anchor_avg: float, anchor_max: float) -> None:
    p50, p99 = statistics.median(values), pct(values, 0.99)
    print(
        f"  {label:<38} p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  "
        f"max {max(values) * 1000:7.1f} ms  | anchor avg {anchor_avg:.1f} s, worst "
        f"{anchor_max:.1f} s  | ratio p50/avg {p50 / anchor_avg:.3f}, "
        f"p99/worst {p99 / anchor_max:.3f}"
    )


async def _until_server(d: Discovery, cluster: str, address: str) -> None:
    def present() -> bool:
        c = d.table.clusters.get(cluster)
        return c is not None and c.server(address) is not None

    await d.wait_for(present, 10)


async def propagation(changes: int, data_dir: Path) -> None:
    cp = ControlPlaneServer(ControlPlaneConfig(port=0, data_dir=data_dir / "cp"))
    await cp.start()
    try:
        async with StoreClient(cp.url) as store, StoreClient(cp.url) as writer:
            config = GatewayConfig(
                store_url=cp.url, data_dir=data_dir, health_interval=60, discovery_wait=2
            )
            d = Discovery(store, config)
            await d.start()
            try:
                results: dict[str, list[float]] = {
                    "isolated": [],
                    "back-to-back": [],
                    "catalog": [],
                }
                for i in range(2 * changes):
                    mode = "isolated" if i < changes else "back-to-back"
                    if mode == "isolated":
                        # Apart enough that the watch's rate limit (10/s) never delays it.
                        await asyncio.sleep(0.25)
                    t = time.perf_counter()
                    await writer.kv_put_json(
                        "berth/gateway/upstreams/bench",
                        {
                            "servers": [{"host": "127.0.0.1", "port": 10000 + i}],
                            "health_check": {"type": "none"},
                        },
                    )
                    await _until_server(d, "bench", f"127.0.0.1:{10000 + i}")
                    results[mode].append(time.perf_counter() - t)
                for i in range(changes):
                    await asyncio.sleep(0.25)
                    t = time.perf_counter()
                    await writer.register_service(
                        "benchsvc", service_id=f"b{i}", address="127.0.0.1", port=20000 + i
                    )
                    await _until_server(d, "benchsvc", f"127.0.0.1:{20000 + i}")
                    results["catalog"].append(time.perf_counter() - t)
                print(f"store change -> routing table swapped ({changes} of each)")
                row(
                    "KV upstream write, isolated",
                    results["isolated"],
                    SLARDAR_SYNC / 2,
                    SLARDAR_SYNC,
                )
                row(
                    "KV upstream write, back-to-back",
                    results["back-to-back"],
                    SLARDAR_SYNC / 2,
                    SLARDAR_SYNC,
                )
                row(
                    "catalog registration, isolated",
                    results["catalog"],
                    SLARDAR_SYNC / 2,
                    SLARDAR_SYNC,
                )
            finally:
                await d.stop()
    finally:
        await cp.stop()


async def first_check(rounds: int) -> None:
    from berth.gateway.cluster import CheckSpec
    from berth.gateway.health import HealthChecker

    async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    listeners = [await asyncio.start_server(accept, "127.0.0.1", 0) for _ in range(rounds + 1)]
    ports = [srv.sockets[0].getsockname()[1] for srv in listeners]
    checker = HealthChecker()
    spec = CheckSpec(interval=CHECKUPS_INTERVAL)
    servers = [Server("127.0.0.1", ports[0])]
    checker.update(RoutingTable((), {"c": Cluster("c", servers, check=spec)}))
    waits: list[float] = []
    try:
        for port in ports[1:]:
            fresh = Server("127.0.0.1", port)
            t = time.perf_counter()
            servers = [*servers, fresh]
            checker.update(RoutingTable((), {"c": Cluster("c", servers, check=spec)}))
            # Polled: a health result is not an event anyone can await.
            while fresh.status is ServerStatus.UNCHECKED:  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
            waits.append(time.perf_counter() - t)
        ok = sum(s.status is ServerStatus.OK for s in servers)
    finally:
        await checker.stop()
        for srv in listeners:
            srv.close()
            await srv.wait_closed()
    print(f"new server -> first health-check result ({rounds} servers, interval 5 s, {ok} ok)")
    row("added server checked", waits, CHECKUPS_INTERVAL / 2, CHECKUPS_INTERVAL)


def pick_costs() -> None:
    print("cost of one decision (this process, no I/O)")
    for n in (2, 10, 100):
        cluster = Cluster("c", [Server("127.0.0.1", 1000 + i) for i in range(n)])
        parts = []
        for lb in ("round_robin", "least_conn", "hash"):
            route = Route("h", "/", "c", lb=lb)  # type: ignore[arg-type]
            number = 20000
            t = timeit.timeit(
                lambda r=route, c=cluster: c.pick(r, b"/img/1.jpg", ()),  # type: ignore[misc]
                number=number,
            )
            parts.append(f"{lb} {t / number * 1e6:5.2f} us")
        print(f"  pick, {n:>3} servers: " + ", ".join(parts))
    routes = [Route(f"h{i}.example.com", "/", "c") for i in range(1000)]
    routes += [Route(f"*.w{i}.example.com", "/", "c") for i in range(1000)]
    table = RoutingTable(routes, {"c": Cluster("c", [Server("127.0.0.1", 1)])})
    number = 50000
    exact = timeit.timeit(lambda: table.resolve("H500.example.com:3130", "/a"), number=number)
    wild = timeit.timeit(lambda: table.resolve("a.b.w500.example.com", "/a"), number=number)
    print(
        f"  resolve among 2000 routes: exact {exact / number * 1e6:.2f} us, "
        f"wildcard {wild / number * 1e6:.2f} us"
    )
    t = time.perf_counter()
    RoutingTable(routes, {"c": Cluster("c", [Server("127.0.0.1", 1)])})
    print(f"  build a 2000-route table: {(time.perf_counter() - t) * 1000:.1f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changes", type=int, default=60)
    args = parser.parse_args()
    # Health transitions of the benchmark's fake servers are not news.
    logging.getLogger("berth.gateway.health").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        await propagation(args.changes, Path(tmp))
    await first_check(50)
    pick_costs()


if __name__ == "__main__":
    asyncio.run(main())
