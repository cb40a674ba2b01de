"""The CLI against a server that speaks only Marathon's API (no berth extensions)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.scheduler.api_support import berth_cli

APP = {
    "id": "/web",
    "cmd": "x",
    "instances": 2,
    "cpus": 0.5,
    "mem": 64,
    "tasksRunning": 2,
    "tasksHealthy": 2,
    "tasksUnhealthy": 0,
    "tasksStaged": 0,
    "deployments": [],
}
# What a real Marathon answers; anything else (berth's /api/...) is a 404 there.
MARATHON: dict[str, Any] = {
    "/v2/apps": {"apps": [APP]},
    "/v2/queue": {"queue": []},
    "/v2/deployments": [],
}
CREATED = False


class Marathon(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        doc = {"app": APP} if path == "/v2/apps/web" and CREATED else MARATHON.get(path)
        body = json.dumps(doc if doc is not None else {"message": "Not Found"}).encode()
        self.send_response(200 if doc is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        # POST /v2/apps as Marathon versions before the Marathon-Deployment-Id header.
        global CREATED
        self.rfile.read(int(self.headers["Content-Length"]))
        CREATED = True
        body = json.dumps({**APP, "deployments": [{"id": "d-1"}]}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def marathon_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Marathon)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_status_works_against_a_plain_marathon(marathon_url: str) -> None:
    r = berth_cli("status", url=marathon_url)
    assert r.returncode == 0, r.stderr
    assert "/web" in r.stdout and "Running" in r.stdout and "2 of 2" in r.stdout


def test_deploy_follows_a_deployment_named_only_in_the_body(
    marathon_url: str, tmp_path: Path
) -> None:
    app = tmp_path / "web.json"
    app.write_text(json.dumps({"id": "web", "cmd": "x", "instances": 2}))
    r = berth_cli("deploy", str(app), url=marathon_url)
    assert r.returncode == 0, r.stderr
    assert "created /web: 2 of 2 running" in r.stdout and "deployment d-1 done" in r.stdout
