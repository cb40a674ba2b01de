"""Through the real gateway: a rolling restart under load fails no request.

What makes it hold: new tasks are in the catalog before old ones go, and an old
task leaves the catalog (store-acknowledged) and drains before its SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import httpx
import pytest

from tests.scheduler.api_support import EventStream
from tests.support import BerthProcess, control_plane

pytestmark = pytest.mark.slow

ECHO = (
    "import http.server,os\n"
    "tid = os.environ['MESOS_TASK_ID'].encode()\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    protocol_version = 'HTTP/1.1'\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(tid)))\n"
    "        self.end_headers(); self.wfile.write(tid)\n"
    "    def log_message(self, *a): pass\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT0'])), H)"
    ".serve_forever()\n"
)


def stop(proc: BerthProcess) -> None:
    proc.stop()
    proc._reader.join(10)
    if proc.proc.stdout is not None:
        proc.proc.stdout.close()


async def test_rolling_restart_under_load_fails_no_request(tmp_path: Path) -> None:
    server = control_plane(tmp_path / "cp")
    gateway: BerthProcess | None = None
    try:
        url = server.wait_ready()
        gateway = BerthProcess(
            ["gateway", "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
             "--data-dir", str(tmp_path / "gw"), "--store-url", url]
        )  # fmt: skip
        gw_url = gateway.wait_ready()
        app = {
            "id": "/roll",
            "args": [sys.executable, "-c", ECHO],
            "instances": 3,
            "cpus": 0.1,
            "mem": 64,
            "portDefinitions": [{"port": 0}],
            "taskKillGracePeriodSeconds": 2,
            "labels": {"BERTH_VHOST": "roll.test"},
            "healthChecks": [{"protocol": "HTTP", "path": "/", "intervalSeconds": 1}],
        }
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as api,
            httpx.AsyncClient(base_url=gw_url, timeout=10) as data,
            EventStream(url, ["deployment_success"]) as events,
        ):
            resp = await api.post("/v2/apps", json=app)
            assert resp.status_code == 201
            await events.wait_for("deployment_success", id=resp.headers["marathon-deployment-id"])
            before = {t["id"] for t in (await api.get("/v2/apps/roll/tasks")).json()["tasks"]}

            answered: list[str] = []
            failures: list[str] = []
            # Counted from when the gateway routes to every task: before that,
            # a request that comes between the gateway learning the route and
            # the service's instances (within the store's propagation time) is
            # answered 503 "no server", which is not what this test is about.
            measuring = False
            wanted: set[str] = set(before)
            # Set when every wanted task has answered through the gateway since the last reset.
            all_answered = asyncio.Event()
            done = asyncio.Event()

            async def client() -> None:
                while not done.is_set():
                    try:
                        resp = await data.get("/", headers={"Host": "roll.test"})
                    except httpx.HTTPError as exc:
                        if measuring:
                            failures.append(repr(exc))
                        continue
                    if resp.status_code != 200:
                        if measuring:
                            failures.append(f"{resp.status_code} {resp.text[:100]}")
                        continue
                    answered.append(resp.text)
                    if wanted <= set(answered[-300:]):
                        all_answered.set()

            load = [asyncio.create_task(client()) for _ in range(6)]
            # The gateway learns the tasks from the catalog: all three answer before we go.
            await asyncio.wait_for(all_answered.wait(), 30)
            measuring = True
            resp = await api.post("/v2/apps/roll/restart")
            assert resp.status_code == 200
            await events.wait_for("deployment_success", id=resp.json()["deploymentId"])
            after = {t["id"] for t in (await api.get("/v2/apps/roll/tasks")).json()["tasks"]}
            # Keep the load on until the new tasks have answered through the gateway too.
            all_answered.clear()
            wanted = after
            await asyncio.wait_for(all_answered.wait(), 30)
            done.set()
            await asyncio.gather(*load)
        assert failures == []
        assert len(after) == 3 and not after & before
        assert before & set(answered) and after <= set(answered)
    finally:
        if gateway is not None:
            stop(gateway)
        stop(server)
