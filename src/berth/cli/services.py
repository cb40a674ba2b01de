"""CLI commands of berth.services: ``berth service imageinfo|imgprocess``."""

from __future__ import annotations

import logging
import os
from typing import Any

import click

from berth import config as configuration
from berth.cli.runtime import run, run_until_signal
from berth.listen import PortInUseError

log = logging.getLogger("berth.services")


def _port_flag(port: int | None) -> int | None:
    # Marathon-style schedulers pass the assigned port in PORT (or PORT0).
    if port is not None:
        return port
    for name in ("PORT", "PORT0"):
        raw = os.environ.get(name)
        if raw:
            if not raw.isdigit():
                raise click.BadParameter(f"{name}={raw!r} is not a port number", param_hint=name)
            return int(raw)
    return None


async def _serve(service: Any) -> None:
    from berth.services.allocator import keep_freed_memory
    from berth.services.shell import ServiceServer

    keep_freed_memory()

    try:
        server = ServiceServer(service.shell, service.app())
    except PortInUseError as exc:
        raise click.ClickException(f"{exc.strerror} (choose another with --port)") from None
    await server.start()
    log.info(
        "%s listening on %s (%d workers)", service.shell.name, server.url, server.shell.pool.workers
    )
    await run_until_signal(server.request_exit, server.wait_stopped)
    log.info("%s stopped", service.shell.name)


_options = [
    click.option("--host", default=None, help="Address to bind (default 127.0.0.1)."),
    click.option("--port", type=int, default=None, help="Port (default: $PORT, else any free)."),
    click.option("--workers", type=int, default=None, help="Worker threads (default: cores + 1)."),
]


def _with_options(fn: Any) -> Any:
    for option in reversed(_options):
        fn = option(fn)
    return fn


@click.group("service")
def service() -> None:
    """Run one processing service (imageinfo, imgprocess)."""


@service.command("imageinfo")
@_with_options
@click.pass_obj
def imageinfo(obj: dict[str, Any], /, **flags: Any) -> None:
    """Image metadata as JSON: PUT or POST an image."""
    from berth.services.config import ImageInfoConfig
    from berth.services.imageinfo import ImageInfoService

    flags["port"] = _port_flag(flags["port"])
    cfg = configuration.load(ImageInfoConfig, "imageinfo", flags, file=obj["config_file"])
    run(_serve(ImageInfoService(cfg)))


@service.command("imgprocess")
@_with_options
@click.option(
    "--watermark-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory that /watermark/url/ paths are read from.",
)
@click.pass_obj
def imgprocess(obj: dict[str, Any], /, **flags: Any) -> None:
    """Image processing with UPYUN-style parameters: PUT or POST an image."""
    from berth.services.config import ImgProcessConfig
    from berth.services.imgprocess.app import ImgProcessService

    flags["port"] = _port_flag(flags["port"])
    cfg = configuration.load(ImgProcessConfig, "imgprocess", flags, file=obj["config_file"])
    run(_serve(ImgProcessService(cfg)))


commands: list[click.Command] = [service]
