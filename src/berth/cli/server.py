"""``berth server``: the control plane (store, scheduler, APIs) in one process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click

from berth import config as configuration
from berth.cli.runtime import run, run_until_signal
from berth.controlplane.config import ControlPlaneConfig
from berth.controlplane.server import ControlPlaneServer
from berth.listen import PortInUseError

log = logging.getLogger("berth.controlplane")


@click.command("server")
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port to bind (default 3131, 0 = any).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--token", default=None, help="Require this token on every API request.")
@click.option("--store-url", default=None, help="Use this Consul instead of the embedded store.")
@click.pass_obj
def server(obj: dict[str, Any], /, **flags: Any) -> None:
    """Run the control plane: Consul-compatible store, scheduler and APIs."""
    cfg = configuration.load(ControlPlaneConfig, "server", flags, file=obj["config_file"])
    run(_serve(cfg))


async def _serve(cfg: ControlPlaneConfig) -> None:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        srv = ControlPlaneServer(cfg)
    except PortInUseError as exc:
        raise click.ClickException(f"{exc.strerror} (choose another with --port)") from None
    await srv.start()
    log.info("control plane listening on %s (data in %s)", srv.url, cfg.data_dir)
    await run_until_signal(srv.request_exit, srv.wait_stopped)


commands: list[click.Command] = [server]
