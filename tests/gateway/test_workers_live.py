"""``berth gateway --workers 2`` as real processes: worker 0's admin API counts the
requests of every worker, shows a server failed by requests on every worker, and
forgets a killed worker's numbers (its successor counts from zero)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from berth.store.client import StoreClient
from tests.gateway.conftest import eventually
from tests.gateway.test_server import ADMIN, start_gateway, stop_process
from tests.support import BerthProcess, control_plane

pytestmark = pytest.mark.slow

REQUESTS = re.compile(
    r'^berth_gateway_requests_total\{route="([^"]*)",status="(\d+)"\} (\d+)$', re.M
)


@pytest.fixture
def store_url(tmp_path: Path) -> Iterator[str]:
    cp = control_plane(tmp_path / "cp")
    try:
        yield cp.wait_ready()
    finally:
        stop_process(cp)


def dead_port() -> int:
    """A port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def short_requests(port: int, host: str, n: int) -> int:
    """n requests, each on its own connection (so the kernel spreads them over
    the workers); each must get a 200 (a failed server is retried on another)."""

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET /w HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            answer = await reader.read(-1)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))
    return n


def requests_total(metrics_text: str) -> int:
    return sum(int(m.group(3)) for m in REQUESTS.finditer(metrics_text))


class Admin:
    def __init__(self, url: str) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=10)

    @classmethod
    async def of(cls, gw: BerthProcess) -> Admin:
        # Worker 0 logs "admin API on" just after "listening on".
        await eventually(lambda: ADMIN.search(gw.output()) is not None)
        found = ADMIN.search(gw.output())
        assert found is not None
        return cls(found.group(1))

    async def status(self) -> dict[str, Any]:
        r = await self.http.get("/status")
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    async def metrics(self) -> str:
        r = await self.http.get("/metrics")
        assert r.status_code == 200, r.text
        return r.text

    async def per_worker(self) -> dict[int, dict[str, Any]]:
        doc = await self.status()
        return {w["worker"]: w for w in doc["workers"]["reporting"]}


async def serve_until_both_workers_answered(port: int, host: str, admin: Admin) -> int:
    """Send batches of short requests until each worker answered some; returns how
    many got a 200 in all."""
    sent = 0
    async with asyncio.timeout(60):
        while True:
            sent += await short_requests(port, host, 20)
            workers = await admin.per_worker()
            if len(workers) == 2 and all(w["requests"] > 0 for w in workers.values()):
                return sent


async def setup_cluster(store_url: str, servers: list[dict[str, Any]]) -> None:
    async with StoreClient(store_url) as store:
        await store.kv_put_json(
            "berth/gateway/upstreams/svc",
            {"servers": servers, "health_check": {"type": "none"}},
        )
        await store.kv_put_json("berth/gateway/routes/app.test", {"cluster": "svc"})


async def test_metrics_and_status_merge_every_worker(store_url, tmp_path, upstreams) -> None:
    a = await upstreams("a")
    bad = dead_port()
    await setup_cluster(
        store_url,
        [
            {"host": "127.0.0.1", "port": a.port},
            {"host": "127.0.0.1", "port": bad, "max_fails": 1, "fail_timeout": 0.05},
        ],
    )
    gw = start_gateway(store_url, tmp_path / "gw", "--workers", "2")
    try:
        admin = await Admin.of(gw)
        port = int(gw.wait_ready().rsplit(":", 1)[1])
        sent = await serve_until_both_workers_answered(port, "app.test", admin)
        # Every request counted, whichever worker answered it (a request is
        # counted once its response is complete, hence the poll).
        async with asyncio.timeout(10):
            while requests_total(await admin.metrics()) != sent:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        text = await admin.metrics()
        assert f'berth_gateway_requests_total{{route="app.test",status="200"}} {sent}' in text
        assert f'berth_gateway_request_seconds_count{{route="app.test"}} {sent}' in text
        assert 'berth_gateway_workers{state="reporting"} 2' in text
        assert 'berth_gateway_worker_start_time_seconds{worker="1"}' in text
        workers = await admin.per_worker()
        assert sum(w["requests"] for w in workers.values()) == sent

        # The refused server failed requests on both workers (each retried on
        # "a"): err with the refusal as msg, and each worker's own status.
        async def bad_server() -> dict[str, Any]:
            doc = await admin.status()
            servers = {s["address"]: s for s in doc["cls:svc"][0]}
            return servers[f"127.0.0.1:{bad}"]

        async with asyncio.timeout(30):
            while (await bad_server())["worker_status"] != {"0": "err", "1": "err"}:
                await short_requests(port, "app.test", 10)
        server = await bad_server()
        assert server["status"] == "err" and server["worker"] in (0, 1)
        assert "refused" in server["msg"], server
        assert server["fail_num"] >= 1
        doc = await admin.status()
        assert doc["config_timer"] == {"worker-0": "alive", "worker-1": "alive"}
        assert doc["workers"]["configured"] == 2 and doc["workers"]["missing"] == []
        labels = f'cluster="svc",server="127.0.0.1:{bad}"'
        text = await admin.metrics()
        assert f'berth_gateway_upstream_server_status{{{labels},status="err"}} 1' in text
        await admin.http.aclose()
    finally:
        assert stop_process(gw) == 0, gw.output()


async def test_a_killed_workers_counts_stay_in_the_totals(store_url, tmp_path, upstreams) -> None:
    a = await upstreams("a")
    await setup_cluster(store_url, [{"host": "127.0.0.1", "port": a.port}])
    gw = start_gateway(store_url, tmp_path / "gw", "--workers", "2")
    try:
        admin = await Admin.of(gw)
        port = int(gw.wait_ready().rsplit(":", 1)[1])
        await serve_until_both_workers_answered(port, "app.test", admin)
        before = await admin.per_worker()
        assert {c.pid for c in psutil.Process(gw.proc.pid).children()} == {
            w["pid"] for w in before.values()
        }
        total_before = requests_total(await admin.metrics())
        assert total_before == before[0]["requests"] + before[1]["requests"]
        os.kill(before[1]["pid"], signal.SIGKILL)
        # The supervisor starts a successor for index 1; it counts from zero, as an
        # nginx worker does after a respawn, while the totals keep what the dead
        # one had counted (a drop would read as a counter reset to Prometheus).
        async with asyncio.timeout(30):
            while (now := await admin.per_worker()).get(1, before[1])["pid"] == before[1]["pid"]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert now[1]["requests"] == 0
        assert (now[0]["pid"], now[0]["requests"]) == (before[0]["pid"], before[0]["requests"])
        assert requests_total(await admin.metrics()) == total_before
        assert "exited with -9; restarting it" in gw.output()
        # And it serves: its counts join the view again.
        await serve_until_both_workers_answered(port, "app.test", admin)
        await admin.http.aclose()
    finally:
        assert stop_process(gw) == 0, gw.output()
