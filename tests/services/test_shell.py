"""The service shell: limits, overload, health, metrics, and a real `berth service` process."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from berth.cli.services import _port_flag
from berth.services.imaging import Watchdog
from berth.services.pool import WorkPool
from tests.support import berth

from .images import decode, encode, jpeg, quadrants, solid


async def test_body_over_the_limit_is_413(start_imageinfo: Callable[..., Any]) -> None:
    async with start_imageinfo(limit_body_bytes=4096) as (client, _):
        big = b"\xff\xd8" + b"\x00" * 10_000
        response = await client.put("/", content=big)
        assert response.status_code == 413
        assert response.json()["error"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"\x00" * 1000

        # No Content-Length: the cap is enforced while streaming.
        response = await client.put("/", content=chunks())
        assert response.status_code == 413
        small = encode(solid(10, 10, (1, 2, 3)), ".png")
        assert (await client.put("/", content=small)).status_code == 200


async def test_full_queue_is_503_with_retry_after(start_imgprocess: Callable[..., Any]) -> None:
    async with start_imgprocess(workers=1, limit_queue=0) as (client, service):
        release = threading.Event()
        started = threading.Event()

        def hold() -> None:
            started.set()
            release.wait(30)

        blocker = asyncio.create_task(service.shell.pool.run(hold))
        await asyncio.to_thread(started.wait, 30)
        assert "running=1 queued=0" in repr(service.shell.pool)
        assert "closing=False" in repr(service)
        response = await client.put("/", content=jpeg(solid(10, 10, (0, 0, 0))))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"] == "overloaded"
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "busy"
        assert (await client.get("/live")).status_code == 200  # busy is not dead
        metrics = (await client.get("/metrics")).text
        assert 'berth_service_in_progress{service="imgprocess"} 1.0' in metrics
        release.set()
        await blocker
        assert (await client.get("/health")).status_code == 200
        response = await client.put("/", content=jpeg(solid(10, 10, (0, 0, 0))))
        assert response.status_code == 200


async def test_metrics_count_requests_errors_and_time(imageinfo: httpx.AsyncClient) -> None:
    await imageinfo.put("/", content=encode(solid(4, 4, (0, 0, 0)), ".png"))
    await imageinfo.put("/", content=b"not an image")
    text = (await imageinfo.get("/metrics")).text
    assert 'berth_service_requests_total{service="imageinfo",status="200"} 1.0' in text
    assert 'berth_service_requests_total{service="imageinfo",status="415"} 1.0' in text
    assert (
        'berth_service_errors_total{code="unsupported_media_type",service="imageinfo"} 1.0' in text
    )
    assert 'berth_service_processing_seconds_count{service="imageinfo"} 2.0' in text
    assert 'berth_service_queue_depth{service="imageinfo"} 0.0' in text


async def test_unknown_routes_and_methods_are_json(imageinfo: httpx.AsyncClient) -> None:
    response = await imageinfo.get("/photo.jpg")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


async def test_pool_repr_and_close() -> None:
    pool = WorkPool(2, 3)
    assert repr(pool) == "<WorkPool open running=0 queued=0 workers=2 queue=3>"
    assert await pool.run(lambda: 7) == 7
    pool.close()
    assert not pool.can_admit()
    assert repr(pool).startswith("<WorkPool closed")


async def test_admission_is_held_until_the_job_really_ends() -> None:
    pool = WorkPool(1, 0)
    with pytest.raises(ValueError):
        async with pool.admit():
            assert repr(pool).startswith("<WorkPool open running=1")
            raise ValueError("the body was bad")
    assert pool.admitted == 0  # given back when the request failed before any job

    release, started = threading.Event(), threading.Event()
    place = pool.admit()

    def job() -> None:
        started.set()
        release.wait(30)

    async def request() -> None:
        async with place:
            await place.run(job)

    task = asyncio.create_task(request())
    await asyncio.to_thread(started.wait, 30)
    assert repr(place) == "<Admission running>"
    task.cancel()  # the client went away; the thread still runs
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.admitted == 1 and not pool.can_admit()
    release.set()
    assert place._job is not None
    await asyncio.wait({place._job})  # its done-callback (the release) ran first
    assert pool.admitted == 0
    assert repr(place) == "<Admission released>"
    pool.close()


def test_port_comes_from_flag_then_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("PORT0", raising=False)
    assert _port_flag(None) is None
    monkeypatch.setenv("PORT0", "4100")
    assert _port_flag(None) == 4100
    monkeypatch.setenv("PORT", "4000")
    assert _port_flag(None) == 4000
    assert _port_flag(5) == 5


@pytest.mark.slow
def test_real_process_serves_and_drains_on_sigterm() -> None:
    with berth("service", "imgprocess", "--port", "0", env={"PORT": ""}) as proc:
        assert proc.url is not None
        with httpx.Client(base_url=proc.url, timeout=60) as client:
            assert client.get("/health").json()["status"] == "ok"
            response = client.put("/cat.jpg!/fw/40/format/png", content=jpeg(quadrants(80, 60)))
            assert response.status_code == 200
            assert decode(response.content).width == 40

            # A slow request is in flight when SIGTERM arrives: it still completes.
            result: dict[str, Any] = {}
            slow = jpeg(quadrants(2000, 2000))

            def send() -> None:
                result["response"] = client.put("/!/gaussblur/50x50/format/png", content=slow)

            sender = threading.Thread(target=send)
            sender.start()
            deadline = time.monotonic() + 30
            while 'in_progress{service="imgprocess"} 1.0' not in client.get("/metrics").text:
                assert time.monotonic() < deadline, "the slow request never started"
                assert sender.is_alive(), result
                time.sleep(0.005)
            proc.signal(signal.SIGTERM)
            sender.join(60)
        assert result["response"].status_code == 200
        assert proc.proc.wait(30) == 0
    # tests/support leaves the pipe to the garbage collector, which warns (warnings are errors).
    proc._reader.join(10)
    assert proc.proc.stdout is not None
    proc.proc.stdout.close()
    assert "imgprocess stopped" in proc.output()


def test_service_config_layers_and_bad_values(tmp_path: Any) -> None:
    from berth.config import ConfigError, load
    from berth.services.config import ImgProcessConfig, default_workers

    toml = tmp_path / "berth.toml"
    toml.write_text("[imgprocess]\nworkers = 3\nlimit_pixels = 1000\n")
    cfg = load(ImgProcessConfig, "imgprocess", {"port": 7}, file=toml, env={})
    assert (cfg.workers, cfg.limit_pixels, cfg.port) == (3, 1000, 7)
    cfg = load(ImgProcessConfig, "imgprocess", {}, file=toml, env={"BERTH_IMGPROCESS_WORKERS": "5"})
    assert cfg.workers == 5
    with pytest.raises(ConfigError, match="watermark_dir"):
        load(ImgProcessConfig, "imgprocess", {"watermark_dir": str(tmp_path / "no")}, env={})
    with pytest.raises(ConfigError, match="workers"):
        load(ImgProcessConfig, "imgprocess", {"workers": 0}, env={})
    # One per core and one for the moments a worker waits.
    assert load(ImgProcessConfig, "imgprocess", {}, env={}).workers == default_workers() >= 2


def test_watchdog_fires_in_deadline_order_and_skips_cancelled() -> None:
    watchdog = Watchdog()
    fired: list[str] = []
    done = threading.Event()
    watchdog.arm(0.4, lambda: fired.append("later"))
    cancelled = watchdog.arm(0.2, lambda: fired.append("cancelled"))
    watchdog.cancel(cancelled)
    assert repr(watchdog) == "<Watchdog armed=1 running=True>"
    watchdog.arm(0.5, lambda: (fired.append("last"), done.set()))
    watchdog.arm(0.0, lambda: 1 / 0)  # a failing callback does not stop the thread
    assert done.wait(10)
    assert fired == ["later", "last"]
