"""The control plane's dispatch and token policy, over a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from berth.controlplane.config import ControlPlaneConfig
from berth.controlplane.server import ControlPlaneServer
from berth.listen import PortInUseError, bind

TOKEN = "s3cret-token-1"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ControlPlaneServer]:
    srv = ControlPlaneServer(ControlPlaneConfig(port=0, data_dir=tmp_path, token=TOKEN))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def test_probes_are_open_and_unknown_paths_are_json_404(server: ControlPlaneServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert (await client.get("/ping")).status_code == 200
        missing = await client.get("/nope", headers={"X-Consul-Token": TOKEN})
        assert missing.status_code == 404
        assert missing.json() == {"message": "no such endpoint: /nope"}


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"X-Consul-Token": TOKEN}, {}),
        ({"Authorization": f"Bearer {TOKEN}"}, {}),
        ({"Authorization": f"token={TOKEN}"}, {}),
        ({}, {"token": TOKEN}),
    ],
    ids=["consul-header", "bearer", "marathon-client", "query"],
)
async def test_every_token_form_is_accepted(
    server: ControlPlaneServer, headers: dict[str, str], params: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        resp = await client.get("/v1/kv/anything", headers=headers, params=params)
        assert resp.status_code == 404  # allowed through, and the key does not exist
        apps = await client.get("/v2/apps", headers=headers, params=params)
        assert apps.status_code == 200


async def test_missing_or_wrong_token_is_403(server: ControlPlaneServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        consul = await client.get("/v1/kv/x")
        assert (consul.status_code, consul.text) == (403, "Permission denied")
        wrong = await client.get("/v1/kv/x", headers={"X-Consul-Token": TOKEN + "x"})
        assert wrong.status_code == 403
        marathon = await client.get("/v2/apps", headers={"Authorization": "Bearer nope"})
        assert marathon.status_code == 403
        assert marathon.json() == {"message": "missing or wrong token"}


def test_busy_port_is_a_clear_error() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        with pytest.raises(PortInUseError, match=r"cannot listen on 127\.0\.0\.1:\d+"):
            bind("127.0.0.1", sock.getsockname()[1])
    finally:
        sock.close()
