"""KV over real sockets: Consul's status codes, headers and edge cases."""

from __future__ import annotations

import asyncio
import base64

import httpx

from tests.store.conftest import RunningStore, eventually


def _index(resp: httpx.Response) -> int:
    return int(resp.headers["X-Consul-Index"])


async def test_put_get_roundtrip_with_headers(http: httpx.AsyncClient) -> None:
    r = await http.put("/v1/kv/app/config", content=b"hello", params={"flags": 42})
    assert r.status_code == 200 and r.json() is True
    r = await http.get("/v1/kv/app/config")
    assert r.status_code == 200
    assert r.headers["X-Consul-KnownLeader"] == "true"
    assert r.headers["X-Consul-LastContact"] == "0"
    [doc] = r.json()
    assert base64.b64decode(doc["Value"]) == b"hello"
    assert doc["Flags"] == 42 and doc["Key"] == "app/config" and doc["LockIndex"] == 0
    assert doc["CreateIndex"] == doc["ModifyIndex"] == _index(r)
    assert "Session" not in doc
    # Flags omitted on a later PUT reset to 0, as in Consul.
    await http.put("/v1/kv/app/config", content=b"x")
    [doc] = (await http.get("/v1/kv/app/config")).json()
    assert doc["Flags"] == 0 and doc["ModifyIndex"] > doc["CreateIndex"]


async def test_missing_key_is_404_with_index(http: httpx.AsyncClient) -> None:
    await http.put("/v1/kv/a", content=b"1")
    r = await http.get("/v1/kv/nope")
    assert r.status_code == 404 and r.content == b""
    assert _index(r) >= 1
    r = await http.get("/v1/kv/nope/", params={"recurse": ""})
    assert r.status_code == 404 and "X-Consul-Index" in r.headers


async def test_empty_value_is_null_and_raw(http: httpx.AsyncClient) -> None:
    await http.put("/v1/kv/empty", content=b"")
    [doc] = (await http.get("/v1/kv/empty")).json()
    assert doc["Value"] is None
    await http.put("/v1/kv/page", content=b"<script>x</script>")
    r = await http.get("/v1/kv/page", params={"raw": ""})
    assert r.content == b"<script>x</script>"
    assert r.headers["content-type"].startswith("text/plain")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["Content-Security-Policy"] == "sandbox"


async def test_recurse_keys_and_separator(http: httpx.AsyncClient) -> None:
    for key in ("web/bar", "web/subdir/a", "web/subdir/b", "webx", "other"):
        await http.put(f"/v1/kv/{key}", content=key.encode())
    r = await http.get("/v1/kv/web/", params={"recurse": "false"})  # presence-only
    assert [d["Key"] for d in r.json()] == ["web/bar", "web/subdir/a", "web/subdir/b"]
    assert _index(r) == max(d["ModifyIndex"] for d in r.json())
    r = await http.get("/v1/kv/web/", params={"keys": "True", "separator": "/"})
    assert r.json() == ["web/bar", "web/subdir/"]
    r = await http.get("/v1/kv/", params={"keys": ""})
    assert r.json() == ["other", "web/bar", "web/subdir/a", "web/subdir/b", "webx"]
    r = await http.get("/v1/kv/zzz", params={"keys": ""})
    assert r.status_code == 404


async def test_delete_recurse_cas_and_prefix_index_after_delete(http: httpx.AsyncClient) -> None:
    for key in ("t/a", "t/b", "t/c/d"):
        await http.put(f"/v1/kv/{key}", content=b"v")
    before = _index(await http.get("/v1/kv/t/", params={"recurse": ""}))
    [doc] = (await http.get("/v1/kv/t/a")).json()
    r = await http.delete("/v1/kv/t/a", params={"cas": doc["ModifyIndex"] + 100})
    assert r.json() is False
    r = await http.delete("/v1/kv/t/a", params={"cas": 0})
    assert r.json() is False
    r = await http.delete("/v1/kv/t/a", params={"cas": doc["ModifyIndex"]})
    assert r.json() is True
    # The prefix index moved forward although the newest key was not the one deleted.
    after = _index(await http.get("/v1/kv/t/", params={"recurse": ""}))
    assert after > before
    assert (await http.delete("/v1/kv/t/", params={"recurse": ""})).json() is True
    r = await http.get("/v1/kv/t/", params={"recurse": ""})
    assert r.status_code == 404 and _index(r) > after
    r = await http.delete("/v1/kv/t", params={"recurse": "", "cas": "1"})
    assert r.status_code == 400


async def test_cas_create_only_and_update(http: httpx.AsyncClient) -> None:
    assert (await http.put("/v1/kv/c", content=b"1", params={"cas": 0})).json() is True
    assert (await http.put("/v1/kv/c", content=b"2", params={"cas": 0})).json() is False
    [doc] = (await http.get("/v1/kv/c")).json()
    r = await http.put("/v1/kv/c", content=b"3", params={"cas": doc["ModifyIndex"]})
    assert r.json() is True
    r = await http.put("/v1/kv/c", content=b"4", params={"cas": doc["ModifyIndex"]})
    assert r.json() is False


async def test_cas_race_exactly_one_wins(http: httpx.AsyncClient) -> None:
    await http.put("/v1/kv/race", content=b"0")
    for round_ in range(20):
        [doc] = (await http.get("/v1/kv/race")).json()
        idx = doc["ModifyIndex"]
        results = await asyncio.gather(
            *(
                http.put("/v1/kv/race", content=f"{round_}-{w}".encode(), params={"cas": idx})
                for w in range(2)
            )
        )
        assert sorted(r.json() for r in results) == [False, True]


async def test_bad_requests(http: httpx.AsyncClient) -> None:
    cases = [
        ("PUT", "/v1/kv/", {}, 400, "Missing key name"),
        ("GET", "/v1/kv/", {}, 400, "Missing key name"),
        ("DELETE", "/v1/kv/", {}, 400, "Missing key name"),
        ("PUT", "/v1/kv/x", {"cas": "1", "acquire": "s"}, 400, "Conflicting flags"),
        ("PUT", "/v1/kv/x", {"flags": "abc"}, 400, "Invalid flags"),
        ("PUT", "/v1/kv/x", {"cas": "-1"}, 400, "Invalid cas"),
        ("GET", "/v1/kv/x", {"index": "zz"}, 400, "Invalid index"),
        ("GET", "/v1/kv/x", {"index": "1", "wait": "soon"}, 400, "Invalid wait time"),
        ("GET", "/v1/kv/x", {"stale": "", "consistent": ""}, 400, "conflicting semantics"),
        ("POST", "/v1/kv/x", {}, 405, "not allowed"),
        ("GET", "/v1/nothing", {}, 404, "unknown endpoint"),
    ]
    for method, path, params, status, message in cases:
        r = await http.request(method, path, params=params)
        assert r.status_code == status, (method, path, params, r.text)
        assert message in r.text, (method, path, r.text)
    # Nothing was written by any of them.
    r = await http.get("/v1/kv/", params={"recurse": ""})
    assert r.status_code == 404


async def test_value_over_512k_is_413_and_not_stored(http: httpx.AsyncClient) -> None:
    r = await http.put("/v1/kv/big", content=b"x" * (512 * 1024 + 1))
    assert r.status_code == 413 and "too large" in r.text
    assert (await http.get("/v1/kv/big")).status_code == 404
    r = await http.put("/v1/kv/big", content=b"x" * (512 * 1024))
    assert r.status_code == 200


async def _raw_request(url: str, request_line: str) -> tuple[int, bytes]:
    """Send a request line exactly as given (httpx would normalise the path)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"{request_line}\r\nHost: x\r\nContent-Length: 1\r\n\r\nv".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    body = await reader.readexactly(length)
    writer.close()
    await writer.wait_closed()
    return status, body


async def test_hostile_keys_are_400(running: RunningStore) -> None:
    hostile = [
        "PUT /v1/kv/a/../b HTTP/1.1",
        "PUT /v1/kv/a/%2e%2e/b HTTP/1.1",
        "PUT /v1/kv/.. HTTP/1.1",
        "PUT /v1/kv/a%00b HTTP/1.1",
        "PUT /v1/kv/a%1bb HTTP/1.1",
        "PUT /v1/kv/%20lead HTTP/1.1",
        "PUT /v1/kv/a/..%5cb HTTP/1.1",
        "GET /v1/kv/a/../../etc/passwd HTTP/1.1",
    ]
    for line in hostile:
        status, body = await _raw_request(running.url, line)
        assert status == 400, (line, status, body)
        assert b"Invalid key" in body
    assert running.store.state.kv == {}
    # Dots inside a segment are ordinary keys.
    status, _ = await _raw_request(running.url, "PUT /v1/kv/a/b..c/.hidden HTTP/1.1")
    assert status == 200


async def test_blocking_get_wakes_on_write(http: httpx.AsyncClient) -> None:
    await http.put("/v1/kv/watched", content=b"1")
    r = await http.get("/v1/kv/watched")
    idx = _index(r)
    waiter = asyncio.create_task(http.get("/v1/kv/watched", params={"index": idx, "wait": "30s"}))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    # A write elsewhere does not wake a single-key watcher...
    await http.put("/v1/kv/other", content=b"x")
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await http.put("/v1/kv/watched", content=b"2")
    r = await asyncio.wait_for(waiter, 5)
    assert r.status_code == 200 and _index(r) > idx
    assert base64.b64decode(r.json()[0]["Value"]) == b"2"


async def test_blocking_prefix_wakes_on_write_below_it(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/kv/svc/", params={"recurse": ""})
    idx = _index(r)
    waiter = asyncio.create_task(
        http.get("/v1/kv/svc/", params={"recurse": "", "index": idx, "wait": "30s"})
    )
    await asyncio.sleep(0.05)
    await http.put("/v1/kv/svc/deep/key", content=b"1")
    r = await asyncio.wait_for(waiter, 5)
    assert [d["Key"] for d in r.json()] == ["svc/deep/key"]


async def test_blocking_timeout_returns_current_index(http: httpx.AsyncClient) -> None:
    await http.put("/v1/kv/quiet", content=b"1")
    idx = _index(await http.get("/v1/kv/quiet"))
    r = await http.get("/v1/kv/quiet", params={"index": idx, "wait": "200ms"})
    assert r.status_code == 200 and _index(r) == idx
    # An index already behind returns at once.
    r = await http.get("/v1/kv/quiet", params={"index": idx - 1, "wait": "10m"})
    assert _index(r) == idx


async def test_txn_commits_all(http: httpx.AsyncClient) -> None:
    await http.put("/v1/kv/tx/old", content=b"o")
    [doc] = (await http.get("/v1/kv/tx/old")).json()
    ops = [
        {"KV": {"Verb": "set", "Key": "tx/a", "Value": base64.b64encode(b"A").decode()}},
        {"KV": {"Verb": "cas", "Key": "tx/old", "Value": "", "Index": doc["ModifyIndex"]}},
        {"KV": {"Verb": "check-not-exists", "Key": "tx/none"}},
        {"KV": {"Verb": "get", "Key": "tx/a"}},
        {"kv": {"verb": "delete", "key": "tx/old"}},
    ]
    r = await http.put("/v1/txn", json=ops)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["Errors"] is None
    assert body["Results"][0]["KV"]["Key"] == "tx/a"
    assert body["Results"][0]["KV"]["Value"] is None
    assert base64.b64decode(body["Results"][2]["KV"]["Value"]) == b"A"
    assert (await http.get("/v1/kv/tx/old")).status_code == 404
    indexes = {
        d["ModifyIndex"] for d in (await http.get("/v1/kv/tx/", params={"recurse": ""})).json()
    }
    assert len(indexes) == 1


async def test_txn_rollback_leaves_nothing(running: RunningStore, http: httpx.AsyncClient) -> None:
    await http.put("/v1/kv/rb/keep", content=b"k")
    before = running.store.state.index
    ops = [
        {"KV": {"Verb": "set", "Key": "rb/new", "Value": "eA=="}},
        {"KV": {"Verb": "delete", "Key": "rb/keep"}},
        {"KV": {"Verb": "check-index", "Key": "rb/keep", "Index": 999999}},
        {"KV": {"Verb": "get", "Key": "rb/missing"}},
    ]
    r = await http.put("/v1/txn", json=ops)
    assert r.status_code == 409
    errors = r.json()["Errors"]
    assert [e["OpIndex"] for e in errors] == [2, 3]
    assert "doesn't exist" in errors[0]["What"] or "index" in errors[0]["What"]
    assert (await http.get("/v1/kv/rb/new")).status_code == 404
    assert (await http.get("/v1/kv/rb/keep")).status_code == 200
    assert running.store.state.index == before
    assert "rb/keep" not in running.store.state.tombstones


async def test_txn_bad_bodies(http: httpx.AsyncClient) -> None:
    assert (await http.put("/v1/txn", content=b"{nope")).status_code == 400
    assert (await http.put("/v1/txn", json={"KV": {}})).status_code == 400
    bad64 = [{"KV": {"Verb": "set", "Key": "k", "Value": "!!"}}]
    assert (await http.put("/v1/txn", json=bad64)).status_code == 400
    many = [{"KV": {"Verb": "get", "Key": "k"}}] * 129
    assert (await http.put("/v1/txn", json=many)).status_code == 413
    r = await http.put("/v1/txn", json=[{"KV": {"Verb": "explode", "Key": "k"}}])
    assert r.status_code == 409 and "unknown KV verb" in r.text
    assert (await http.get("/v1/txn")).status_code == 405


async def test_hung_up_watcher_is_forgotten(running: RunningStore) -> None:
    hub = running.store.hub
    host, port = running.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /v1/kv/gone/?recurse&index=1&wait=5m HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await eventually(lambda: "prefixes=1" in repr(hub))
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: "prefixes=0 topics=0 waiters=0" in repr(hub))
    # A watcher that times out leaves nothing behind either.
    r = await running.http.get("/v1/kv/quiet/", params={"recurse": "", "index": 1, "wait": "50ms"})
    assert r.status_code == 404
    assert "prefixes=0 topics=0 waiters=0" in repr(hub)
