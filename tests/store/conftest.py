"""Fixtures: the store served over a real socket on 127.0.0.1.

``store`` runs the control plane's ASGI app (token policy included) with only
the store mounted, under uvicorn on port 0, so tests can tune the store's
config (short session TTLs, fast reaping) without waiting minutes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from berth.controlplane.app import ControlPlaneApp
from berth.listen import bind
from berth.store.config import StoreConfig
from berth.store.server import StoreServer


@dataclass
class RunningStore:
    url: str
    store: StoreServer
    http: httpx.AsyncClient


FAST = {
    "session_ttl_min_s": 0.2,
    "session_ttl_multiplier": 1.0,
    "deregister_min_s": 0.0,
    "reap_interval_s": 0.2,
}


@asynccontextmanager
async def serve_store(
    data_dir: Path, token: str | None = None, port: int = 0, **overrides: Any
) -> AsyncIterator[RunningStore]:
    store = StoreServer(StoreConfig(data_dir=data_dir, **overrides))
    app = ControlPlaneApp([store], token=token)
    sock = bind("127.0.0.1", port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            http="httptools",
            loop="none",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=1,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    headers = {"X-Consul-Token": token} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        try:
            yield RunningStore(url, store, http)
        finally:
            server.should_exit = True
            await task
            sock.close()


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[RunningStore]:
    async with serve_store(tmp_path / "store", **FAST) as rs:
        yield rs


@pytest.fixture
def http(running: RunningStore) -> httpx.AsyncClient:
    return running.http


async def eventually(
    probe: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """Poll ``probe`` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = probe()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
