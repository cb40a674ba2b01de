from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from berth.services.config import ImageInfoConfig, ImgProcessConfig
from berth.services.imageinfo import ImageInfoService
from berth.services.imgprocess.app import ImgProcessService
from berth.services.shell import ServiceServer

from .images import solid

Running = tuple[httpx.AsyncClient, Any]


@asynccontextmanager
async def serve(service: Any) -> AsyncIterator[Running]:
    """The service on a real socket (port 0) in this test's loop, and a client for it."""
    server = ServiceServer(service.shell, service.app())
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            yield client, service
    finally:
        await server.stop()


@pytest.fixture
def watermark_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "watermarks"
    folder.mkdir()
    (folder / "blue.png").write_bytes(solid(20, 20, (0, 0, 255)).pngsave_buffer())
    return folder


@pytest.fixture
def start_imgprocess(
    watermark_dir: Path,
) -> Callable[..., Any]:
    def start(**config: Any) -> Any:
        config.setdefault("watermark_dir", watermark_dir)
        return serve(ImgProcessService(ImgProcessConfig(**config)))

    return start


@pytest.fixture
def start_imageinfo() -> Callable[..., Any]:
    def start(**config: Any) -> Any:
        return serve(ImageInfoService(ImageInfoConfig(**config)))

    return start


@pytest.fixture
async def imgprocess(start_imgprocess: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with start_imgprocess() as (client, _):
        yield client


@pytest.fixture
async def imageinfo(start_imageinfo: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with start_imageinfo() as (client, _):
        yield client
