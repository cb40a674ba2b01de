"""Hostile and malformed input: a clear 4xx, nothing applied, the server keeps serving."""

from __future__ import annotations

import httpx

from tests.store.conftest import RunningStore

DEEP = b"[" * 100_000 + b"]" * 100_000

CASES: list[tuple[str, str, dict[str, str], bytes]] = [
    ("PUT", "/v1/agent/service/register", {}, b""),
    ("PUT", "/v1/agent/service/register", {}, b"null"),
    ("PUT", "/v1/agent/service/register", {}, DEEP),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": 5}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "Port": "80"}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "Check": "x"}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "Checks": [null]}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "Checks": {"TTL": "1s"}}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "Weights": {"Passing": "1"}}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "TaggedAddresses": []}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "Weights": {"Passing": true}}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "EnableTagOverride": "no"}'),
    (
        "PUT",
        "/v1/agent/service/register",
        {},
        b'{"Name": "a", "Check": {"TTL": "1s", "TLSSkipVerify": 1}}',
    ),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "Check": {"TTL": 1e400}}'),
    ("PUT", "/v1/agent/service/register", {}, b'{"Name": "a", "Check": {"TCP": "nohost"}}'),
    ("PUT", "/v1/agent/service/register", {}, b'\xff\xfe{"Name": "a"}'),
    ("PUT", "/v1/session/create", {}, b'{"TTL": 123}'),
    ("PUT", "/v1/session/create", {}, b'{"LockDelay": 99999999999999}'),
    ("PUT", "/v1/session/create", {}, b'{"Checks": "serfHealth"}'),
    ("PUT", "/v1/session/create", {}, b'{"Name": ["x"]}'),
    ("PUT", "/v1/session/create", {}, b"[]"),
    ("PUT", "/v1/session/create", {}, DEEP),
    ("PUT", "/v1/txn", {}, b"null"),
    ("PUT", "/v1/txn", {}, b'[{"KV": null}]'),
    ("PUT", "/v1/txn", {}, b'[{"KV": {"Verb": "set", "Key": "a", "Flags": -1}}]'),
    ("PUT", "/v1/txn", {}, b'[{"KV": {"Verb": 1, "Key": "a"}}]'),
    ("PUT", "/v1/txn", {}, b'[{"KV": {"Verb": "set", "Key": "a", "Index": "1"}}]'),
    ("PUT", "/v1/txn", {}, b'[{"Node": {"Verb": "set"}}]'),
    ("PUT", "/v1/txn", {}, DEEP),
    ("PUT", "/v1/kv/k", {"flags": "18446744073709551616"}, b"v"),
    ("PUT", "/v1/kv/k", {"acquire": ""}, b"v"),
    ("GET", "/v1/kv/k", {"index": "1", "wait": "1e400s"}, b""),
    ("GET", "/v1/kv/k", {"index": "-5"}, b""),
    ("GET", "/v1/kv/k", {"wait": "soon"}, b""),
    ("GET", "/v1/health/service/k", {"index": "999999", "wait": "10"}, b""),
    ("PUT", "/v1/agent/check/update/x", {}, b'{"Status": ["passing"]}'),
    ("PUT", "/v1/agent/check/explode/x", {}, b""),
    ("GET", "/v1/health/state/sideways", {}, b""),
    ("GET", "/v1/kv/k", {"dc": "mars"}, b""),
    ("DELETE", "/v1/session/destroy/x", {}, b""),
]


async def test_hostile_inputs(running: RunningStore, http: httpx.AsyncClient) -> None:
    before = running.store.state.index
    for method, path, params, body in CASES:
        r = await http.request(method, path, params=params, content=body)
        assert 400 <= r.status_code < 500 or (r.status_code == 500 and "datacenter" in r.text), (
            method,
            path,
            body[:60],
            r.status_code,
            r.text,
        )
        assert r.text and "Traceback" not in r.text, (path, r.text)
    assert running.store.state.index == before
    assert running.store.state.services == {} and running.store.state.sessions == {}
    # Still serving.
    assert (await http.put("/v1/kv/alive", content=b"1")).json() is True


async def test_oversized_bodies(http: httpx.AsyncClient) -> None:
    big = b"[" + b"1," * 600_000 + b"1]"
    for path in ("/v1/txn", "/v1/agent/service/register", "/v1/session/create"):
        r = await http.put(path, content=big)
        assert r.status_code == 413, (path, r.status_code)
