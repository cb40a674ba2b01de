"""CLI commands of berth.gateway (owned by that component)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from berth import config as configuration
from berth.gateway.config import GatewayConfig


@click.command("gateway")
@click.option("--host", default=None, help="Address of the data port (default 0.0.0.0).")
@click.option("--port", type=int, default=None, help="Data port (default 3130, 0 = any).")
@click.option("--admin-port", type=int, default=None, help="Admin API port (default 3132).")
@click.option("--workers", type=int, default=None, help="Worker processes (default 1).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--store-url", default=None, help="The store (Consul API) to read routes from.")
@click.option("--token", default=None, help="Store token; also required for admin writes.")
@click.pass_obj
def gateway(obj: dict[str, Any], /, **flags: Any) -> None:
    """Run the gateway: route by Host to upstream clusters from the store."""
    from berth.gateway.server import run_gateway
    from berth.listen import PortInUseError

    cfg = configuration.load(GatewayConfig, "gateway", flags, file=obj["config_file"])
    try:
        raise SystemExit(run_gateway(cfg))
    except PortInUseError as exc:
        raise click.ClickException(f"{exc.strerror} (choose another with --port)") from None


commands: list[click.Command] = [gateway]
