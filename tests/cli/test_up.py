"""`berth up` end to end: real processes, real ports, real images through the gateway."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import pyvips

pytestmark = pytest.mark.slow

UP_LINE = re.compile(r"gateway\s+(http://127\.0\.0\.1:\d+)")
CONTROL_LINE = re.compile(r"control plane\s+(http://127\.0\.0\.1:\d+)")
ADMIN_LINE = re.compile(r"gateway admin\s+(http://127\.0\.0\.1:\d+)/status")


class Up:
    def __init__(self, data_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "berth.cli.main",
                "up",
                "--data-dir",
                str(data_dir),
                "--gateway-port",
                "0",
                "--control-port",
                "0",
                "--admin-port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.gateway: str | None = None
        self.control: str | None = None
        self.admin: str | None = None
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if (m := CONTROL_LINE.search(line)) and self.control is None:
                self.control = m.group(1)
            if (m := ADMIN_LINE.search(line)) and self.admin is None:
                self.admin = m.group(1)
            if (m := UP_LINE.search(line)) and self.gateway is None:
                self.gateway = m.group(1)
                self.ready.set()
        self.ready.set()

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path / "data")
    try:
        assert up.ready.wait(100), up.output()
        assert up.gateway is not None, up.output()
        yield up
    finally:
        up.stop()


def _jpeg(width: int, height: int) -> bytes:
    image = pyvips.Image.black(width, height).new_from_image([200, 40, 40])
    return bytes(image.cast("uchar").jpegsave_buffer(Q=90))


@pytest.mark.timeout(240)
def test_up_serves_both_builtin_services_and_stops_clean(platform: Up) -> None:
    children = _descendants(platform.proc.pid)
    # control plane, gateway, 2 x imageinfo, 2 x imgprocess at least
    assert len(children) >= 6, [c.cmdline() for c in children]

    body = _jpeg(640, 480)
    info = httpx.put(platform.gateway + "/", content=body, headers={"Host": "imageinfo"})
    assert info.status_code == 200, info.text
    doc = info.json()
    assert (doc["width"], doc["height"], doc["format"]) == (640, 480, "jpg")

    thumb = httpx.put(
        platform.gateway + "/!/fw/320/format/png", content=body, headers={"Host": "imgprocess"}
    )
    assert thumb.status_code == 200, thumb.text
    out = pyvips.Image.new_from_buffer(thumb.content, "")
    assert (out.width, out.height) == (320, 240)

    assert platform.control is not None
    apps = httpx.get(platform.control + "/v2/apps").json()["apps"]
    assert sorted(a["id"] for a in apps) == ["/imageinfo", "/imgprocess"]
    assert all(a["tasksHealthy"] == 2 for a in apps), json.dumps(apps)

    assert platform.admin is not None, platform.output()
    status = httpx.get(platform.admin + "/status").json()
    servers = [s for level in status["cls:imageinfo"] for s in level]
    assert len(servers) == 2 and all(s["status"] == "ok" for s in servers), status

    assert platform.stop() == 0, platform.output()
    deadline = time.monotonic() + 10
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children):
        assert time.monotonic() < deadline, [c for c in children if c.is_running()]
        time.sleep(0.1)


def test_up_refuses_a_busy_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "berth.cli.main",
                "up",
                "--data-dir",
                str(tmp_path),
                "--control-port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert f"port {port} is already in use" in result.stderr
    assert "--control-port" in result.stderr
    assert result.stderr.count("\n") <= 2


@pytest.mark.timeout(240)
def test_up_again_on_the_same_data_dir_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Up(data)
    try:
        assert first.ready.wait(100), first.output()
        assert first.control is not None
        before = {
            a["id"]: a["version"] for a in httpx.get(first.control + "/v2/apps").json()["apps"]
        }
    finally:
        assert first.stop() == 0, first.output()

    second = Up(data)
    try:
        assert second.ready.wait(100), second.output()
        assert second.control is not None and second.gateway is not None
        apps = httpx.get(second.control + "/v2/apps").json()["apps"]
        # Resumed from the store, not deployed anew: same definitions, same versions.
        assert {a["id"]: a["version"] for a in apps} == before
        assert "resuming app /imageinfo" in second.output()
        info = httpx.put(second.gateway + "/", content=_jpeg(64, 48), headers={"Host": "imageinfo"})
        assert info.status_code == 200, info.text
    finally:
        assert second.stop() == 0, second.output()
