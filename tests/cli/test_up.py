"""`berth up` end to end: real processes, real ports, real images through the gateway."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import pyvips

from tests.support import BerthProcess

pytestmark = pytest.mark.slow

UP_LINE = re.compile(r"gateway\s+(http://127\.0\.0\.1:\d+)")
CONTROL_LINE = re.compile(r"control plane\s+(http://127\.0\.0\.1:\d+)")
ADMIN_LINE = re.compile(r"gateway admin\s+(http://127\.0\.0\.1:\d+)/status")


class Up(BerthProcess):
    """``berth up`` on free ports; ready once its banner names the gateway."""

    ready_line = UP_LINE
    control: str | None = None
    admin: str | None = None

    def __init__(self, data_dir: Path) -> None:
        ports = ["--gateway-port", "0", "--control-port", "0", "--admin-port", "0"]
        super().__init__(["up", "--data-dir", str(data_dir), *ports])

    def _on_line(self, line: str) -> None:
        if self.control is None and (m := CONTROL_LINE.search(line)):
            self.control = m.group(1)
        if self.admin is None and (m := ADMIN_LINE.search(line)):
            self.admin = m.group(1)

    @property
    def gateway(self) -> str:
        assert self.url is not None
        return self.url

    def stop(self, timeout: float = 90, sig: int | None = signal.SIGINT) -> int:
        # Ctrl-C, as a person stops `make run`; the ordered stop takes a few seconds.
        return super().stop(timeout, sig)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path / "data")
    try:
        up.wait_ready(100)
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
        first.wait_ready(100)
        assert first.control is not None
        before = {
            a["id"]: a["version"] for a in httpx.get(first.control + "/v2/apps").json()["apps"]
        }
    finally:
        assert first.stop() == 0, first.output()

    second = Up(data)
    try:
        second.wait_ready(100)
        assert second.control is not None
        apps = httpx.get(second.control + "/v2/apps").json()["apps"]
        # Resumed from the store, not deployed anew: same definitions, same versions.
        assert {a["id"]: a["version"] for a in apps} == before
        assert "resuming app /imageinfo" in second.output()
        info = httpx.put(second.gateway + "/", content=_jpeg(64, 48), headers={"Host": "imageinfo"})
        assert info.status_code == 200, info.text
    finally:
        assert second.stop() == 0, second.output()
