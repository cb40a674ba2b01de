"""berth.store.client against the real store: calls, errors, and a watch that
survives a store restart and an index reset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from berth.listen import bind
from berth.store.client import KVEntry, StoreClient
from berth.store.errors import PermissionDenied, StoreRejected, StoreUnavailable
from tests.store.conftest import FAST, RunningStore, serve_store


async def test_client_calls(running: RunningStore) -> None:
    async with StoreClient(running.url) as client:
        assert await client.kv_put("c/a", "1") is True
        assert await client.kv_put_json("c/j", {"x": 1}) is True
        entry = await client.kv_get("c/j")
        assert entry is not None and entry.json() == {"x": 1}
        assert await client.kv_get("c/missing") is None
        index, entries = await client.kv_list("c/")
        assert [e.key for e in entries] == ["c/a", "c/j"] and index > 1
        assert await client.kv_keys("c/") == ["c/a", "c/j"]
        ok, results = await client.txn([{"KV": {"Verb": "get", "Key": "c/a"}}])
        assert ok and results[0]["KV"]["Key"] == "c/a"
        ok, errors = await client.txn([{"KV": {"Verb": "get", "Key": "c/none"}}])
        assert not ok and errors[0]["OpIndex"] == 0
        await client.register_service(
            "svc", service_id="svc1", port=9, check={"TTL": "30s", "Status": "passing"}
        )
        _, instances = await client.health_service("svc", passing=True)
        assert [i.id for i in instances] == ["svc1"] and instances[0].address == "127.0.0.1"
        await client.check_update("service:svc1", "fail", note="down")
        _, instances = await client.health_service("svc", passing=True)
        assert instances == []
        sid = await client.session_create(ttl="10s")
        assert await client.kv_put("c/lock", "me", acquire=sid) is True
        assert await client.session_renew(sid) is True
        await client.session_destroy(sid)
        assert await client.session_renew(sid) is False
        with pytest.raises(StoreRejected) as err:
            await client.kv_put("c/\x01x", "1")
        assert err.value.status == 400
        with pytest.raises(StoreRejected):
            await client.kv_put("c/../x", "1")
        assert await client.kv_get("x") is None
        assert await client.kv_put("c/odd?key#%20", "1") is True
        odd = await client.kv_get("c/odd?key#%20")
        assert odd is not None and odd.key == "c/odd?key#%20"
        assert await client.kv_delete("c/", recurse=True) is True


async def test_client_errors(tmp_path: Path) -> None:
    async with (
        serve_store(tmp_path, token="right-token") as rs,
        StoreClient(rs.url, token="wrong-token") as client,
    ):
        with pytest.raises(PermissionDenied):
            await client.kv_get("x")
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    async with StoreClient(f"http://127.0.0.1:{port}") as client:
        with pytest.raises(StoreUnavailable):
            await client.kv_get("x")


async def test_rate_limited_429_is_retried_not_fatal() -> None:
    """Consul answers 429 when a client is over its limits: that means "later",
    so a watch must back off and retry instead of dying."""
    answers = [
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 12\r\n\r\nrate limited",
        b"HTTP/1.1 200 OK\r\nX-Consul-Index: 5\r\nContent-Type: application/json\r\n"
        b'Content-Length: 86\r\n\r\n[{"Key":"p/a","Value":"MQ==","Flags":0,'
        b'"CreateIndex":5,"ModifyIndex":5,"LockIndex":0}]',
    ]

    async def consul(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while answers:
            if not await reader.readuntil(b"\r\n\r\n"):
                break
            writer.write(answers.pop(0))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(consul, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with StoreClient(f"http://127.0.0.1:{port}", retry_max_delay=0.1) as client:
            async for index, entries in client.watch_prefix("p/"):
                assert index == 5 and [e.value for e in entries] == [b"1"]
                break
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.slow
async def test_watch_survives_restart_and_index_reset(tmp_path: Path) -> None:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    updates: asyncio.Queue[list[KVEntry]] = asyncio.Queue()

    async def watch(client: StoreClient) -> None:
        async for _, entries in client.watch_prefix("cfg/", wait="30s"):
            await updates.put(entries)

    async def next_keys(expected: list[str]) -> list[str]:
        # The watch may yield intermediate states (an empty store) first.
        while True:
            keys = [e.key for e in await asyncio.wait_for(updates.get(), 20)]
            if keys == expected:
                return keys

    client = StoreClient(f"http://127.0.0.1:{port}", retry_max_delay=0.5)
    watcher: asyncio.Task[None] | None = None
    try:
        async with serve_store(tmp_path / "a", port=port, **FAST) as first:
            for i in range(30):  # push the index well above a fresh store's
                await first.http.put("/v1/kv/cfg/a", content=str(i).encode())
            high = first.store.state.index
            watcher = asyncio.create_task(watch(client))
            assert await next_keys(["cfg/a"])
        # A different, empty store on the same address: the index went backwards.
        async with serve_store(tmp_path / "b", port=port, **FAST) as second:
            assert second.store.state.index < high
            await second.http.put("/v1/kv/cfg/b", content=b"new")
            assert await next_keys(["cfg/b"])
        # The same store restarted: its data and index come back from SQLite.
        async with serve_store(tmp_path / "b", port=port, **FAST) as third:
            await third.http.put("/v1/kv/cfg/c", content=b"more")
            assert await next_keys(["cfg/b", "cfg/c"])
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await client.close()


async def test_watch_service_follows_health(running: RunningStore) -> None:
    async with StoreClient(running.url) as client:
        await client.register_service("api", service_id="api1", port=1, check={"TTL": "30s"})
        watch = client.watch_service("api", passing=True, wait="30s")
        _, first = await asyncio.wait_for(anext(watch), 10)
        assert first == []
        await client.check_update("service:api1", "pass")
        _, second = await asyncio.wait_for(anext(watch), 10)
        assert [i.id for i in second] == ["api1"] and second[0].status == "passing"
        await watch.aclose()  # type: ignore[attr-defined]
