"""The store inside a real ``berth server`` process: token policy and kill -9 durability."""

from __future__ import annotations

import asyncio
import random
import signal
from pathlib import Path

import httpx
import pytest

from tests.support import berth, control_plane


def test_token_required_for_reads_and_writes(tmp_path: Path) -> None:
    token = "s3cret-token"
    with berth("server", "--port", "0", "--data-dir", str(tmp_path), "--token", token) as proc:
        url = proc.wait_ready()
        with httpx.Client(base_url=url) as http:
            for method, path in [
                ("GET", "/v1/kv/a"),
                ("PUT", "/v1/kv/a"),
                ("DELETE", "/v1/kv/a"),
                ("GET", "/v1/catalog/services"),
                ("PUT", "/v1/session/create"),
            ]:
                r = http.request(method, path)
                assert r.status_code == 403 and r.text == "Permission denied", (method, path)
            r = http.put("/v1/kv/a", content=b"1", headers={"X-Consul-Token": "wrong-token"})
            assert r.status_code == 403
            r = http.put("/v1/kv/a", content=b"1", headers={"X-Consul-Token": token})
            assert r.status_code == 200
            assert http.get("/v1/kv/a", params={"token": token}).status_code == 200
            assert http.get("/v1/kv/a").status_code == 403


async def _storm(url: str, acked: dict[str, bytes], seen: list[int], stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:

        async def writer(w: int) -> None:
            n = 0
            while not stop.is_set():
                key = f"storm/{w}/{n}"
                value = f"{w}-{n}-{random.random()}".encode()
                try:
                    r = await http.put(f"/v1/kv/{key}", content=value)
                except httpx.HTTPError:
                    return  # the server died mid-request: not acknowledged
                if r.status_code == 200 and r.json() is True:
                    acked[key] = value
                n += 1

        async def reader() -> None:
            while not stop.is_set():
                try:
                    r = await http.get("/v1/kv/storm/", params={"keys": ""})
                except httpx.HTTPError:
                    return
                seen.append(int(r.headers["X-Consul-Index"]))

        await asyncio.gather(*(writer(w) for w in range(16)), reader())


@pytest.mark.slow
async def test_kill_9_during_write_storm_loses_no_acknowledged_write(tmp_path: Path) -> None:
    proc = control_plane(tmp_path)
    try:
        url = await asyncio.to_thread(proc.wait_ready)
        acked: dict[str, bytes] = {}
        seen: list[int] = []
        stop = asyncio.Event()
        storm = asyncio.create_task(_storm(url, acked, seen, stop))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        # Nothing to await here: poll the acknowledged count with a deadline.
        while len(acked) < 1500 and loop.time() < deadline:
            if storm.done():
                break
            await asyncio.sleep(0.05)
        proc.signal(signal.SIGKILL)  # mid-storm: requests are in flight
        await asyncio.to_thread(proc.proc.wait)
        stop.set()
        await storm
    finally:
        proc.stop()
    assert len(acked) >= 100, "the storm did not get going"
    restarted = control_plane(tmp_path)
    try:
        url = await asyncio.to_thread(restarted.wait_ready)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r = await http.get("/v1/kv/storm/", params={"recurse": ""})
            stored = {d["Key"]: d for d in r.json()}
            missing = [k for k in acked if k not in stored]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
            import base64

            for key, value in acked.items():
                assert base64.b64decode(stored[key]["Value"]) == value
            # The index never goes backwards across the crash.
            assert int(r.headers["X-Consul-Index"]) >= max(seen)
            await http.put("/v1/kv/after", content=b"x")
            r = await http.get("/v1/kv/after")
            assert int(r.headers["X-Consul-Index"]) > max(seen)
    finally:
        restarted.stop()
