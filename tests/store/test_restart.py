"""Everything the store holds comes back from SQLite after a restart, indexes only grow."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from berth.store.config import StoreConfig
from berth.store.model import Session
from berth.store.persist import PersistenceFailed
from berth.store.server import StoreServer
from tests.store.conftest import FAST, eventually, serve_store


async def test_restart_restores_kv_services_sessions_and_indexes(tmp_path: Path) -> None:
    async with serve_store(tmp_path, **FAST) as rs:
        http = rs.http
        await http.put("/v1/kv/cfg/a", content=b"1", params={"flags": 9})
        await http.put("/v1/kv/cfg/gone", content=b"x")
        await http.delete("/v1/kv/cfg/gone")
        await http.put(
            "/v1/agent/service/register",
            json={"Name": "web", "ID": "w1", "Tags": ["t"], "Check": {"TTL": "60s"}},
        )
        await http.put("/v1/agent/check/pass/service:w1", params={"note": "fine"})
        sid = (await http.put("/v1/session/create", json={"TTL": "60s"})).json()["ID"]
        assert (await http.put("/v1/kv/cfg/lock", params={"acquire": sid})).json() is True
        before_kv = (await http.get("/v1/kv/cfg/", params={"recurse": ""})).json()
        prefix_index = int(
            (await http.get("/v1/kv/cfg/", params={"recurse": ""})).headers["X-Consul-Index"]
        )
        health_index = int((await http.get("/v1/health/service/web")).headers["X-Consul-Index"])
        index = rs.store.state.index
    async with serve_store(tmp_path, **FAST) as rs:
        http = rs.http
        assert rs.store.state.index == index
        r = await http.get("/v1/kv/cfg/", params={"recurse": ""})
        assert r.json() == before_kv
        assert int(r.headers["X-Consul-Index"]) == prefix_index  # tombstone kept it
        r = await http.get("/v1/health/service/web", params={"passing": ""})
        assert [e["Service"]["ID"] for e in r.json()] == ["w1"]
        assert r.json()[0]["Checks"][1]["Output"] == "fine"
        assert int(r.headers["X-Consul-Index"]) == health_index
        [session] = (await http.get(f"/v1/session/info/{sid}")).json()
        assert session["TTL"] == "60s"
        assert (await http.put(f"/v1/session/renew/{sid}")).status_code == 200
        await http.put("/v1/kv/cfg/b", content=b"2")
        assert rs.store.state.index == index + 1


async def test_tombstones_are_reaped_after_their_ttl(tmp_path: Path) -> None:
    async with serve_store(tmp_path, tombstone_ttl_s=0.4, **FAST) as rs:
        await rs.http.put("/v1/kv/t/a", content=b"1")
        await rs.http.delete("/v1/kv/t/a")
        assert "t/a" in rs.store.state.tombstones
        await rs.http.put("/v1/kv/other", content=b"1")
        await eventually(lambda: "t/a" not in rs.store.state.tombstones)
        await rs.http.put("/v1/kv/flush", content=b"1")  # the reap rides the next commit
    async with serve_store(tmp_path, **FAST) as rs:
        assert rs.store.state.tombstones == {}


async def test_after_a_failed_commit_nothing_is_applied_or_served(tmp_path: Path) -> None:
    """Once a commit fails, memory is ahead of disk: the store must neither apply
    further writes (each answered 500 yet visible) nor serve what a restart
    would lose."""
    async with serve_store(tmp_path, **FAST) as rs:
        http = rs.http
        assert (await http.put("/v1/kv/kept", content=b"1")).json() is True
        index = int(
            (await http.get("/v1/kv/other/", params={"recurse": ""})).headers["X-Consul-Index"]
        )
        blocked = asyncio.ensure_future(
            http.get("/v1/kv/other/", params={"recurse": "", "index": index, "wait": "1s"})
        )
        await eventually(lambda: "waiters=1" in repr(rs.store.hub))
        db = rs.store.persistence._db
        assert db is not None
        db.close()  # the disk goes away under the store
        r = await http.put("/v1/kv/lost", content=b"1")
        assert r.status_code == 500 and "commit failed" in r.text
        index = rs.store.state.index
        r = await http.put("/v1/kv/later", content=b"1")
        assert r.status_code == 500
        assert rs.store.state.index == index and "later" not in rs.store.state.kv
        # A reader that was blocked when the commit failed answers the failure too.
        r = await blocked
        assert r.status_code == 500 and "persistence failed" in r.text, r.text
        for path in ("/v1/kv/lost", "/v1/kv/kept", "/v1/agent/services"):
            r = await http.get(path)
            assert r.status_code == 500 and "persistence failed" in r.text, (path, r.text)
    async with serve_store(tmp_path, **FAST) as rs:
        assert (await rs.http.get("/v1/kv/kept")).status_code == 200
        assert (await rs.http.get("/v1/kv/lost")).status_code == 404


async def test_a_commit_landing_during_stop_arms_no_timer(tmp_path: Path) -> None:
    """A write still committing when stop() begins must not arm a session or
    check timer after the runners stopped (it would fire into a closed store)."""
    store = StoreServer(StoreConfig(data_dir=tmp_path))
    await store.start()
    session = Session("s", "", "berth", 0, "release", "30s", (), (), 0, 0)
    pending = asyncio.ensure_future(store.write(lambda tx: tx.session_create(session)))
    await asyncio.sleep(0)  # applied in memory, its commit under way
    await store.stop()
    await pending
    assert "armed=0" in repr(store.sessions), store.sessions
    assert "probes=0 ttl=0" in repr(store.checks), store.checks
    with pytest.raises(PersistenceFailed, match="closed"):
        await store.write(lambda tx: tx.kv_set("late", b"1", 0))
