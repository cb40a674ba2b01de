"""Sessions and locks over real sockets: acquire/release, expiry, behaviors, lock delay."""

from __future__ import annotations

import asyncio

import httpx

from tests.store.conftest import RunningStore, eventually


async def _session(http: httpx.AsyncClient, **body: object) -> str:
    r = await http.put("/v1/session/create", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["ID"])


async def test_create_info_list_renew_destroy(http: httpx.AsyncClient) -> None:
    r = await http.put("/v1/session/create")  # empty body: all defaults
    sid = r.json()["ID"]
    [info] = (await http.get(f"/v1/session/info/{sid}")).json()
    assert info["Behavior"] == "release" and info["LockDelay"] == 15_000_000_000
    assert info["NodeChecks"] == ["serfHealth"] and info["Node"] == "berth"
    sid2 = await _session(http, name="n", ttl="15s", behavior="delete", lockdelay="0s")
    listed = (await http.get("/v1/session/list")).json()
    assert [s["ID"] for s in listed] == [sid, sid2]
    assert (await http.get("/v1/session/node/berth")).json() == listed
    r = await http.put(f"/v1/session/renew/{sid2}")
    assert r.status_code == 200 and r.json()[0]["TTL"] == "15s"
    assert (await http.put(f"/v1/session/destroy/{sid2}")).json() is True
    r = await http.put(f"/v1/session/renew/{sid2}")
    assert r.status_code == 404 and "not found" in r.text
    r = await http.get(f"/v1/session/info/{sid2}")
    assert r.json() == [] and "X-Consul-Index" in r.headers


async def test_bad_sessions(http: httpx.AsyncClient) -> None:
    for body, message in [
        ({"TTL": "100000s"}, "Invalid Session TTL"),
        ({"Behavior": "explode"}, "Invalid Behavior"),
        ({"LockDelay": "5m"}, "LockDelay"),
        ({"Checks": ["nope"]}, "Missing check"),
        ({"Node": "elsewhere"}, "Missing node"),
    ]:
        r = await http.put("/v1/session/create", json=body)
        assert r.status_code in (400, 500) and message in r.text, (body, r.text)
    assert (await http.get("/v1/session/list")).json() == []


async def test_acquire_release_and_contention(http: httpx.AsyncClient) -> None:
    a = await _session(http, LockDelay="0s")
    b = await _session(http, LockDelay="0s")
    r = await http.put("/v1/kv/lock", content=b"a", params={"acquire": a})
    assert r.json() is True
    [doc] = (await http.get("/v1/kv/lock")).json()
    assert doc["Session"] == a and doc["LockIndex"] == 1
    assert (await http.put("/v1/kv/lock", content=b"b", params={"acquire": b})).json() is False
    # Re-acquire by the holder updates the value, LockIndex unchanged.
    assert (await http.put("/v1/kv/lock", content=b"a2", params={"acquire": a})).json() is True
    [doc] = (await http.get("/v1/kv/lock")).json()
    assert doc["LockIndex"] == 1
    assert (await http.put("/v1/kv/lock", params={"release": b})).json() is False
    assert (await http.put("/v1/kv/lock", params={"release": a})).json() is True
    [doc] = (await http.get("/v1/kv/lock")).json()
    assert "Session" not in doc and doc["LockIndex"] == 1
    assert (await http.put("/v1/kv/lock", params={"acquire": b})).json() is True
    [doc] = (await http.get("/v1/kv/lock")).json()
    assert doc["LockIndex"] == 2 and doc["Session"] == b
    r = await http.put("/v1/kv/lock", params={"acquire": "00000000-0000-0000-0000-000000000000"})
    assert r.status_code == 500 and "invalid session" in r.text


async def test_concurrent_acquire_one_leader(http: httpx.AsyncClient) -> None:
    sessions = [await _session(http, LockDelay="0s") for _ in range(8)]
    results = await asyncio.gather(
        *(http.put("/v1/kv/leader", content=s.encode(), params={"acquire": s}) for s in sessions)
    )
    assert sum(r.json() is True for r in results) == 1


async def test_session_expiry_releases_lock_and_wakes_follower(
    running: RunningStore, http: httpx.AsyncClient
) -> None:
    sid = await _session(http, TTL="0.5s", LockDelay="0s")
    assert (await http.put("/v1/kv/svc/leader", params={"acquire": sid})).json() is True
    r = await http.get("/v1/kv/svc/leader")
    follower = asyncio.create_task(
        http.get("/v1/kv/svc/leader", params={"index": r.headers["X-Consul-Index"], "wait": "30s"})
    )
    r = await asyncio.wait_for(follower, 10)
    [doc] = r.json()
    assert "Session" not in doc
    assert (await http.get(f"/v1/session/info/{sid}")).json() == []
    assert running.store.sessions.expired == 1


async def test_renew_keeps_session_alive(running: RunningStore, http: httpx.AsyncClient) -> None:
    sid = await _session(http, TTL="0.6s")
    for _ in range(8):
        await asyncio.sleep(0.15)
        assert (await http.put(f"/v1/session/renew/{sid}")).status_code == 200
    await eventually(lambda: sid not in running.store.state.sessions)


async def test_delete_behavior_and_lock_delay(http: httpx.AsyncClient) -> None:
    d = await _session(http, Behavior="delete", LockDelay="0s")
    await http.put("/v1/kv/eph", content=b"x", params={"acquire": d})
    await http.put(f"/v1/session/destroy/{d}")
    assert (await http.get("/v1/kv/eph")).status_code == 404
    r = await _session(http, LockDelay="30s")
    await http.put("/v1/kv/delayed", params={"acquire": r})
    await http.put(f"/v1/session/destroy/{r}")
    [doc] = (await http.get("/v1/kv/delayed")).json()
    assert "Session" not in doc
    other = await _session(http)
    # The lock delay refuses a new holder for a while after invalidation.
    assert (await http.put("/v1/kv/delayed", params={"acquire": other})).json() is False


async def test_session_tied_to_check_invalidated_when_critical(http: httpx.AsyncClient) -> None:
    await http.put(
        "/v1/agent/service/register",
        json={"Name": "w", "Check": {"CheckID": "w-ttl", "TTL": "30s", "Status": "passing"}},
    )
    sid = await _session(http, Checks=["serfHealth", "w-ttl"], LockDelay="0s")
    await http.put("/v1/kv/w/lock", params={"acquire": sid})
    await http.put("/v1/agent/check/fail/w-ttl")
    assert (await http.get(f"/v1/session/info/{sid}")).json() == []
    [doc] = (await http.get("/v1/kv/w/lock")).json()
    assert "Session" not in doc
    r = await http.put("/v1/session/create", json={"Checks": ["w-ttl"]})
    assert r.status_code == 500 and "critical" in r.text
