"""The Marathon API when its store (an external one, via store_url) goes away."""

from __future__ import annotations

from pathlib import Path

import httpx

from berth.controlplane.config import ControlPlaneConfig
from berth.controlplane.server import ControlPlaneServer


async def test_store_down_is_503_with_retry_after(tmp_path: Path) -> None:
    store = ControlPlaneServer(ControlPlaneConfig(port=0, data_dir=tmp_path / "store"))
    await store.start()
    scheduler = ControlPlaneServer(
        ControlPlaneConfig(port=0, data_dir=tmp_path / "sched", store_url=store.url)
    )
    await scheduler.start()
    try:
        async with httpx.AsyncClient(base_url=scheduler.url, timeout=30) as http:
            assert (await http.get("/v2/apps")).status_code == 200
            await store.stop()
            app = {"id": "/down", "cmd": "sleep 60", "instances": 1}
            resp = await http.post("/v2/apps", json=app)
            assert resp.status_code == 503, resp.text
            assert resp.headers["retry-after"] == "1"
            assert "store is unavailable" in resp.json()["message"]
    finally:
        await scheduler.stop()
