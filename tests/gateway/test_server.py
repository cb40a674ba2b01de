"""The gateway as real processes: a real control plane (store), real upstreams,
store changes under load, graceful SIGTERM, and a rolling restart of workers."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import deque
from pathlib import Path

import httpx
import psutil
import pytest

from berth.store.client import StoreClient
from tests.gateway.conftest import eventually, read_response
from tests.support import BerthProcess, control_plane

pytestmark = pytest.mark.slow

ADMIN = re.compile(r"admin API on (http://[\d.:]+)")


@pytest.fixture
def store_url(tmp_path: Path):
    cp = control_plane(tmp_path / "cp")
    try:
        yield cp.wait_ready()
    finally:
        stop_process(cp)


def start_gateway(store_url: str, data_dir: Path, *extra: str) -> BerthProcess:
    proc = BerthProcess(
        [
            "gateway",
            "--host", "127.0.0.1",
            "--port", "0",
            "--admin-port", "0",
            "--store-url", store_url,
            "--data-dir", str(data_dir),
            *extra,
        ],
        env={"BERTH_GATEWAY_SHUTDOWN_GRACE": "10"},
    )  # fmt: skip
    proc.wait_ready()
    return proc


def stop_process(proc: BerthProcess) -> int:
    """Stop it (SIGTERM to the group) and release its output pipe."""
    code = proc.stop()
    proc._reader.join(5)
    if proc.proc.stdout is not None:
        proc.proc.stdout.close()
    return code


async def put_upstream(store: StoreClient, name: str, ports: list[int]) -> None:
    servers = [{"host": "127.0.0.1", "port": p} for p in ports]
    await store.kv_put_json(f"berth/gateway/upstreams/{name}", {"servers": servers})


class Load:
    """Clients sending requests back to back until stopped; every outcome is kept."""

    def __init__(self, url: str, host: str, clients: int = 4) -> None:
        self.url, self.host, self.clients = url, host, clients
        self.statuses: dict[int | str, int] = {}
        self.seen: set[str] = set()
        self.recent: deque[str] = deque(maxlen=20)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.clients)]
        return self

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers={"Host": self.host}) as client:
            while not self._stop.is_set():
                try:
                    r = await client.get("/load")
                    key: int | str = r.status_code
                    if r.status_code == 200:
                        self.seen.add(r.headers["x-upstream"])
                        self.recent.append(r.headers["x-upstream"])
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                self.statuses[key] = self.statuses.get(key, 0) + 1

    async def stop(self) -> dict[int | str, int]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.statuses


async def test_store_changes_reach_traffic_under_load_without_failures(
    store_url, tmp_path, upstreams
) -> None:
    a = await upstreams("a")
    b = await upstreams("b")
    async with StoreClient(store_url) as store:
        await put_upstream(store, "svc", [a.port])
        await store.kv_put_json("berth/gateway/routes/app.test", {"cluster": "svc"})
        gw = start_gateway(store_url, tmp_path / "gw")
        try:
            load = Load(gw.wait_ready(), "app.test").start()
            await eventually(lambda: "a" in load.seen)
            await put_upstream(store, "svc", [a.port, b.port])
            await eventually(lambda: "b" in load.seen)
            await put_upstream(store, "svc", [b.port])
            try:
                await eventually(lambda: set(load.recent) == {"b"} and len(load.recent) == 20)
            finally:
                statuses = await load.stop()
            assert set(statuses) == {200}, statuses
            # The admin API of worker 0 shows the cluster as the store has it now.
            admin = ADMIN.search(gw.output())
            assert admin is not None, gw.output()
            async with httpx.AsyncClient(base_url=admin.group(1)) as client:
                status = (await client.get("/status")).json()
                docs = [s for level in status["cls:svc"] for s in level]
                servers = [s["server"] for s in docs]
                assert any(str(b.port) in s for s in servers)
                assert not any(str(a.port) in s for s in servers)
                # One worker: its own view, as before workers were merged.
                assert "workers" not in status and "worker" not in docs[0]
                assert status["config_timer"] == {"worker-0": "alive"}
                text = (await client.get("/metrics")).text
                assert 'berth_gateway_requests_total{route="app.test",status="200"}' in text
                assert "berth_gateway_workers" not in text
        finally:
            assert stop_process(gw) == 0, gw.output()


async def test_100mb_upload_keeps_gateway_process_memory_bounded(
    store_url, tmp_path, upstreams
) -> None:
    a = await upstreams("a")
    async with StoreClient(store_url) as store:
        await put_upstream(store, "svc", [a.port])
    gw = start_gateway(store_url, tmp_path / "gw")
    try:
        proc = psutil.Process(gw.proc.pid)
        before = proc.memory_info().rss
        peak = 0
        block = b"q" * (1 << 20)

        async def body():
            nonlocal peak
            for _ in range(100):
                peak = max(peak, proc.memory_info().rss - before)
                yield block

        async with httpx.AsyncClient(base_url=gw.url, headers={"Host": "svc"}, timeout=60) as c:
            r = await c.put("/upload", content=body())
        assert r.status_code == 200 and r.json()["body_size"] == 100 << 20
        assert peak < 20 << 20, f"gateway RSS grew by {peak >> 20} MiB"
    finally:
        stop_process(gw)


async def test_sigterm_finishes_in_flight_then_exits(store_url, tmp_path, upstreams) -> None:
    a = await upstreams("a")
    async with StoreClient(store_url) as store:
        await put_upstream(store, "svc", [a.port])
    gw = start_gateway(store_url, tmp_path / "gw")
    port = int(gw.wait_ready().rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /hold HTTP/1.1\r\nHost: svc\r\n\r\n")
    await a.app.arrived.wait()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    gw.signal(signal.SIGTERM)

    async def refused() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except ConnectionRefusedError:
            return True
        w.close()
        return False

    # Draining: new connections are refused; the idle keep-alive connection
    # may still carry one request, answered with Connection: close.
    async with asyncio.timeout(10):
        while not await refused():  # noqa: ASYNC110 (nothing announces the listener's close)
            await asyncio.sleep(0.02)
    idle_writer.write(b"GET /after HTTP/1.1\r\nHost: svc\r\n\r\n")
    status, headers, _ = await read_response(idle_reader)
    assert status == 200 and headers["connection"] == "close"
    assert await idle_reader.read(-1) == b""
    a.app.hold.set()
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers["connection"] == "close"
    assert gw.proc.wait(15) == 0
    assert stop_process(gw) == 0
    writer.close()
    idle_writer.close()


async def test_rolling_restart_of_workers_loses_no_request(store_url, tmp_path, upstreams) -> None:
    a = await upstreams("a")
    async with StoreClient(store_url) as store:
        await put_upstream(store, "svc", [a.port])
    gw = start_gateway(store_url, tmp_path / "gw", "--workers", "2")
    try:
        load = Load(gw.wait_ready(), "svc").start()
        await eventually(lambda: load.statuses.get(200, 0) > 20)
        before = {c.pid for c in psutil.Process(gw.proc.pid).children()}
        assert len(before) == 2
        os.kill(gw.proc.pid, signal.SIGHUP)  # the supervisor only, not the group
        await eventually(
            lambda: (
                gw.output().count("listening on") >= 4
                and not before & {c.pid for c in psutil.Process(gw.proc.pid).children()}
            ),
            timeout=60,
        )
        done = load.statuses.get(200, 0)
        await eventually(lambda: load.statuses.get(200, 0) > done + 20)
        statuses = await load.stop()
        assert set(statuses) == {200}, statuses
        # Each successor took over its predecessor's place in the merged view.
        after = {c.pid for c in psutil.Process(gw.proc.pid).children()}
        admin = ADMIN.findall(gw.output())[-1]
        async with httpx.AsyncClient(base_url=admin) as client:
            async with asyncio.timeout(30):
                while True:
                    status = (await client.get("/status")).json()
                    pids = {w["pid"] for w in status["workers"]["reporting"]}
                    if pids == after:
                        break
                    await asyncio.sleep(0.05)
            assert status["config_timer"] == {"worker-0": "alive", "worker-1": "alive"}
    finally:
        assert stop_process(gw) == 0, gw.output()
