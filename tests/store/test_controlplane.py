"""The store inside the real control plane (in-process, port 0)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from berth.controlplane.config import ControlPlaneConfig
from berth.controlplane.server import ControlPlaneServer
from berth.store.server import StoreServer
from tests.store.conftest import eventually


async def test_stop_answers_blocked_readers_instead_of_cancelling_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = ControlPlaneServer(ControlPlaneConfig(port=0, data_dir=tmp_path))
    await srv.start()
    [store] = [c for c in srv.app.components if isinstance(c, StoreServer)]
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        await http.put("/v1/kv/cp/a", content=b"1")
        r = await http.get("/v1/kv/cp/", params={"recurse": ""})
        index = r.headers["X-Consul-Index"]
        waiter = asyncio.create_task(
            http.get("/v1/kv/cp/", params={"recurse": "", "index": index, "wait": "10m"})
        )
        await eventually(lambda: "prefixes=1" in repr(store.hub))
        with caplog.at_level(logging.INFO, logger="uvicorn.error"):
            await srv.stop()
        r = await waiter
    assert r.status_code == 200 and r.headers["X-Consul-Index"] == index
    assert "timeout graceful shutdown exceeded" not in caplog.text
    assert "closed" in repr(store)
