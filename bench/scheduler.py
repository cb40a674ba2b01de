"""Scheduler benchmark: time to healthy, scaling 1 -> 50, control-plane RSS.

Anchors are the issue's targets (Marathon itself cannot run here): ``berth up``
to all built-in tasks healthy <= 5 s; one app 1 -> 50 instances healthy and
routable through the gateway <= 15 s. Ratios < 1 beat the target.

    .venv/bin/python bench/scheduler.py [--instances 50] [--skip-up]

Runs real ``berth`` processes on loopback with port 0 and a temporary data dir.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

TARGET_UP = 5.0
TARGET_SCALE = 15.0
BUILTINS = ("imageinfo", "imgprocess")

# Answers every request with its task id, so the bench can see which instances serve.
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


def echo_app(app_id: str, instances: int, vhost: str | None = None) -> dict[str, Any]:
    app: dict[str, Any] = {
        "id": app_id,
        "args": [sys.executable, "-c", ECHO],
        "instances": instances,
        "cpus": 0.05,
        "mem": 64,
        "portDefinitions": [{"port": 0}],
        "healthChecks": [
            {"protocol": "HTTP", "path": "/", "gracePeriodSeconds": 30, "intervalSeconds": 2}
        ],
        "upgradeStrategy": {"minimumHealthCapacity": 1.0, "maximumOverCapacity": 1.0},
    }
    if vhost:
        app["labels"] = {"BERTH_VHOST": vhost}
    return app


class Proc:
    """A ``berth`` subcommand; waits for a line matching a pattern in its output."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "berth.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def wait_line(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._new:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(self.lines[-30:])
                    raise RuntimeError(f"no line matching {pattern!r}:\n{tail}")
                self._new.wait(left)

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def wait_healthy(client: httpx.AsyncClient, app_id: str, n: int, timeout: float) -> None:
    # Polls the Marathon API as a client would; 20 ms steps bound the error.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.get(f"/v2/apps{app_id}", params={"embed": "app.counts"})
        if resp.status_code == 200:
            app = resp.json()["app"]
            if app["tasksHealthy"] >= n and not app.get("deployments"):
                return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"{app_id} not {n} healthy within {timeout}s")


async def wait_routable(gateway: str, host: str, ids: set[str], timeout: float) -> int:
    """Until every task id answered through the gateway; returns requests sent."""
    deadline = time.monotonic() + timeout
    seen: set[str] = set()
    sent = 0
    async with httpx.AsyncClient(base_url=gateway, timeout=10) as data:
        while not ids <= seen:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(seen & ids)}/{len(ids)} instances routable")
            batch = await asyncio.gather(
                *(data.get("/", headers={"Host": host}) for _ in range(50)),
                return_exceptions=True,
            )
            sent += len(batch)
            seen.update(r.text for r in batch if isinstance(r, httpx.Response) and r.is_success)
    return sent


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def control_pid(parent: int) -> int:
    for child in psutil.Process(parent).children(recursive=True):
        if "server" in child.cmdline():
            return child.pid
    return parent


def reaper_rss() -> float:
    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        if any(a.endswith("driver/reaper.py") for a in proc.info["cmdline"] or []):
            total += proc.memory_info().rss / 2**20
    return total


def row(name: str, value: float, target: float | None, unit: str = "s") -> None:
    ratio = f"{value / target:5.2f}x target ({target:g} {unit})" if target else ""
    print(f"  {name:<52} {value:8.2f} {unit}  {ratio}")


async def bench_server(data: Path, instances: int) -> None:
    """Without ``berth up``: two apps x two instances, then 1 -> N, on ``berth server``."""
    server = Proc(["server", "--port", "0", "--data-dir", str(data)])
    try:
        url = server.wait_line(r"listening on (http://[\d.:]+)").group(1)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            t0 = time.monotonic()
            for name in ("a", "b"):
                assert (await client.post("/v2/apps", json=echo_app(f"/{name}", 2))).is_success
            await asyncio.gather(*(wait_healthy(client, f"/{n}", 2, 60) for n in ("a", "b")))
            row("2 apps x 2 instances deployed -> healthy", time.monotonic() - t0, TARGET_UP)

            assert (await client.post("/v2/apps", json=echo_app("/scale", 1))).is_success
            await wait_healthy(client, "/scale", 1, 60)
            t0 = time.monotonic()
            resp = await client.put("/v2/apps/scale", json={"instances": instances})
            assert resp.is_success, resp.text
            await wait_healthy(client, "/scale", instances, 120)
            row(f"scale 1 -> {instances} until all healthy", time.monotonic() - t0, TARGET_SCALE)
            row(
                f"control-plane RSS with {instances + 4} tasks",
                rss_mib(server.proc.pid),
                None,
                "MiB",
            )
            row("reaper sidecar RSS", reaper_rss(), None, "MiB")
    finally:
        server.stop()


async def bench_up(data: Path, instances: int) -> None:
    t0 = time.monotonic()
    up = Proc(
        [
            "up",
            "--data-dir",
            str(data),
            "--gateway-port",
            "0",
            "--control-port",
            "0",
            "--admin-port",
            "0",
        ]
    )
    try:
        control = up.wait_line(r"control plane listening on (http://[\d.:]+)").group(1)
        async with httpx.AsyncClient(base_url=control, timeout=30) as client:
            # The scheduler's share, measured apart from the gateway's readiness.
            await asyncio.gather(*(wait_healthy(client, f"/{n}", 2, 120) for n in BUILTINS))
        row("berth up -> built-in tasks healthy (control plane)", time.monotonic() - t0, TARGET_UP)
        printed = float(up.wait_line(r"berth is up in ([\d.]+)s", timeout=180).group(1))
        wall = time.monotonic() - t0
        row("berth up -> healthy and routed (as printed)", printed, TARGET_UP)
        row("berth up -> ready line (wall, from spawn)", wall, TARGET_UP)
        gateway = up.wait_line(r"gateway\s+(http://[\d.:]+)").group(1)
        async with httpx.AsyncClient(base_url=control, timeout=30) as client:
            app = echo_app("/scale", 1, vhost="scale.bench")
            assert (await client.post("/v2/apps", json=app)).is_success
            await wait_healthy(client, "/scale", 1, 60)
            await wait_routable(gateway, "scale.bench", set(), 30)
            t0 = time.monotonic()
            resp = await client.put("/v2/apps/scale", json={"instances": instances})
            assert resp.is_success, resp.text
            await wait_healthy(client, "/scale", instances, 120)
            healthy_at = time.monotonic() - t0
            tasks = (await client.get("/v2/apps/scale/tasks")).json()["tasks"]
            sent = await wait_routable(gateway, "scale.bench", {t["id"] for t in tasks}, 60)
            routable_at = time.monotonic() - t0
            row(f"scale 1 -> {instances}: all healthy", healthy_at, TARGET_SCALE)
            row(
                f"scale 1 -> {instances}: all answered via gateway ({sent} req)",
                routable_at,
                TARGET_SCALE,
            )
            pid = control_pid(up.proc.pid)
            row(f"control-plane RSS with {instances + 4} tasks", rss_mib(pid), None, "MiB")
            row("reaper sidecar RSS", reaper_rss(), None, "MiB")
    finally:
        t0 = time.monotonic()
        up.stop()
        row("berth up stop (SIGTERM -> exit)", time.monotonic() - t0, None)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--instances", type=int, default=50)
    parser.add_argument("--skip-up", action="store_true")
    opts = parser.parse_args()
    print(f"berth scheduler bench ({os.cpu_count()} cpus); targets from issue 4")
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        print("berth server (no gateway):")
        await bench_server(Path(tmp) / "server", opts.instances)
        if not opts.skip_up:
            print("berth up (control plane + gateway + built-in apps):")
            try:
                await bench_up(Path(tmp) / "up", opts.instances)
            except RuntimeError as exc:
                print(f"  berth up bench failed: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
