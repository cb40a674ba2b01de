"""``berth kv`` and ``berth services`` as a user runs them, against a real berth server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support import berth

TOKEN = "cli-token-123"


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data_dir: Path = tmp_path_factory.mktemp("cli")
    with berth("server", "--port", "0", "--data-dir", str(data_dir), "--token", TOKEN) as proc:
        yield proc.wait_ready()


def cli(
    store_url: str, *args: str, stdin: str | None = None, token: str | None = TOKEN
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BERTH_STORE_URL": store_url}
    if token:
        env["BERTH_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "berth.cli.main", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_put_get_delete(store_url: str) -> None:
    r = cli(store_url, "kv", "put", "app/name", "berth")
    assert r.returncode == 0 and "Success! Data written to: app/name" in r.stdout
    r = cli(store_url, "kv", "put", "app/multi", "-", stdin="line1\nline2\n")
    assert r.returncode == 0
    assert cli(store_url, "kv", "get", "app/name").stdout == "berth\n"
    assert cli(store_url, "kv", "get", "app/multi").stdout == "line1\nline2\n"
    r = cli(store_url, "kv", "get", "app/", "--recurse")
    assert r.stdout.splitlines() == ["app/multi:line1", "line2", "", "app/name:berth"]
    assert cli(store_url, "kv", "get", "", "--keys").stdout.splitlines() == ["app/"]
    r = cli(store_url, "kv", "delete", "app/", "--recurse")
    assert r.returncode == 0
    r = cli(store_url, "kv", "get", "app/name")
    assert r.returncode == 1 and r.stderr.strip() == "berth: no key exists at: app/name"


def test_errors_are_one_line(store_url: str) -> None:
    r = cli(store_url, "kv", "get", "x", token=None)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("berth: 403")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("http://127.0.0.1:1", "kv", "get", "x")
    assert r.returncode == 1 and r.stderr.startswith("berth: ")
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli(store_url, "kv", "put", "bad/../key", "v")
    assert r.returncode == 1 and "400" in r.stderr


def test_services_table(store_url: str) -> None:
    assert cli(store_url, "services").stdout.strip() == "no services registered"
    body = {"Name": "web", "ID": "web-1", "Port": 8080, "Check": {"TTL": "30s"}}
    httpx.put(
        store_url + "/v1/agent/service/register", json=body, headers={"X-Consul-Token": TOKEN}
    ).raise_for_status()
    r = cli(store_url, "services")
    assert r.returncode == 0
    assert "web-1" in r.stdout and "127.0.0.1:8080" in r.stdout and "critical" in r.stdout


def test_watch_prints_changes_and_stops_cleanly(store_url: str) -> None:
    env = {**os.environ, "BERTH_STORE_URL": store_url, "BERTH_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "berth.cli.main", "kv", "watch", "w/"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("# index")  # the initial (empty) state
        assert cli(store_url, "kv", "put", "w/one", "1").returncode == 0
        assert proc.stdout.readline().startswith("# index")
        assert proc.stdout.readline().strip() == "w/one:1"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
