"""Compatibility: the third-party py-consul client against a real ``berth server``."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import consul
import consul.exceptions
import pytest

from tests.support import berth

TOKEN = "py-consul-token"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[consul.Consul]:
    data_dir: Path = tmp_path_factory.mktemp("pyconsul")
    with berth("server", "--port", "0", "--data-dir", str(data_dir)) as proc:
        url = urlsplit(proc.wait_ready())
        yield consul.Consul(host=url.hostname, port=url.port)


def test_kv_put_get_delete_recurse(client: consul.Consul) -> None:
    assert client.kv.put("pc/a", "1") is True
    assert client.kv.put("pc/b/c", "2", flags=5) is True
    index, entry = client.kv.get("pc/a")
    assert entry["Value"] == b"1" and int(index) >= entry["ModifyIndex"]
    index, missing = client.kv.get("pc/none")
    assert missing is None and int(index) >= 1
    _, entries = client.kv.get("pc/", recurse=True)
    assert [(e["Key"], e["Value"], e["Flags"]) for e in entries] == [
        ("pc/a", b"1", 0),
        ("pc/b/c", b"2", 5),
    ]
    _, keys = client.kv.get("pc/", keys=True, separator="/")
    assert keys == ["pc/a", "pc/b/"]
    assert client.kv.delete("pc/", recurse=True) is True
    assert client.kv.get("pc/", recurse=True)[1] is None


def test_kv_cas(client: consul.Consul) -> None:
    assert client.kv.put("cas/k", "v1", cas=0) is True
    assert client.kv.put("cas/k", "v2", cas=0) is False
    _, entry = client.kv.get("cas/k")
    assert client.kv.put("cas/k", "v3", cas=entry["ModifyIndex"]) is True
    assert client.kv.put("cas/k", "v4", cas=entry["ModifyIndex"]) is False
    _, entry = client.kv.get("cas/k")
    assert client.kv.delete("cas/k", cas=entry["ModifyIndex"] + 1) is False
    assert client.kv.delete("cas/k", cas=entry["ModifyIndex"]) is True


def test_blocking_get(client: consul.Consul) -> None:
    client.kv.put("block/k", "before")
    index, _ = client.kv.get("block/k")
    result: dict[str, object] = {}

    def wait() -> None:
        result["got"] = client.kv.get("block/k", index=index, wait="30s")

    waiter = threading.Thread(target=wait)
    waiter.start()
    client.kv.put("block/k", "after")
    waiter.join(20)
    assert not waiter.is_alive()
    new_index, entry = result["got"]  # type: ignore[misc]
    assert entry["Value"] == b"after" and int(new_index) > int(index)


def test_service_health_passing_with_ttl(client: consul.Consul) -> None:
    check = consul.Check.ttl("15s")
    assert client.agent.service.register(
        "web", service_id="web2", address="127.0.0.1", port=8080, tags=["t"], check=check
    )
    _, nodes = client.health.service("web", passing=True)
    assert nodes == []
    assert client.agent.check.ttl_pass("service:web2", notes="ok")
    _, nodes = client.health.service("web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web2"]
    assert nodes[0]["Service"]["Port"] == 8080
    _, services = client.catalog.services()
    assert services["web"] == ["t"]
    assert "web2" in client.agent.services()
    assert client.agent.service.deregister("web2")
    assert client.health.service("web")[1] == []


def test_session_acquire_release(client: consul.Consul) -> None:
    sid = client.session.create(name="leader", ttl=15, behavior="delete", lock_delay=0)
    other = client.session.create(lock_delay=0)
    assert client.kv.put("svc/leader", "me", acquire=sid) is True
    assert client.kv.put("svc/leader", "you", acquire=other) is False
    _, entry = client.kv.get("svc/leader")
    assert entry["Session"] == sid
    assert client.kv.put("svc/leader", "me", release=sid) is True
    assert client.kv.put("svc/leader", "you", acquire=other) is True
    _, info = client.session.info(sid)
    assert info["Name"] == "leader" and info["Behavior"] == "delete"
    assert client.session.renew(sid)["ID"] == sid
    assert client.session.destroy(sid) is True
    with pytest.raises(consul.NotFound):
        client.session.renew(sid)
    assert client.session.destroy(other) is True
    # Behavior delete does not apply to other's release-behavior lock: it is released.
    _, entry = client.kv.get("svc/leader")
    assert "Session" not in entry


def test_txn_and_errors(client: consul.Consul) -> None:
    value = base64.b64encode(b"t").decode()
    result = client.txn.put([{"KV": {"Verb": "set", "Key": "txn/a", "Value": value}}])
    assert result["Errors"] is None
    # A rollback is a 409, which py-consul raises as a ClientError.
    with pytest.raises(consul.ConsulException):
        client.txn.put([{"KV": {"Verb": "get", "Key": "txn/missing"}}])
    with pytest.raises(consul.exceptions.BadRequest):
        client.kv.put("bad\x01key", "x")


def test_token(tmp_path: Path) -> None:
    with berth("server", "--port", "0", "--data-dir", str(tmp_path), "--token", TOKEN) as proc:
        url = urlsplit(proc.wait_ready())
        allowed = consul.Consul(host=url.hostname, port=url.port, token=TOKEN)
        assert allowed.kv.put("k", "v") is True
        denied = consul.Consul(host=url.hostname, port=url.port)
        with pytest.raises(consul.ACLPermissionDenied):
            denied.kv.get("k")


def test_check_register_ttl_and_catalog_reads(client: consul.Consul) -> None:
    assert client.agent.service.register("db", service_id="db1", port=5432)
    assert client.agent.check.register(
        "db-alive", check=consul.Check.ttl("30s"), check_id="db-ttl", service_id="db1"
    )
    assert client.agent.checks()["db-ttl"]["Status"] == "critical"
    assert client.agent.check.ttl_pass("db-ttl")
    _, nodes = client.health.service("db", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["db1"]
    _, instances = client.catalog.service("db")
    assert instances[0]["ServicePort"] == 5432
    assert client.status.leader() == "127.0.0.1:8300"
    _, sessions = client.session.list()
    assert isinstance(sessions, list)
    assert client.agent.check.deregister("db-ttl")
    assert client.agent.service.deregister("db1")
