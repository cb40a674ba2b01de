"""Entry point of the ``berth`` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from berth import __version__
from berth.cli import gateway, scheduler, server, services, store, up
from berth.cli.logformat import setup as setup_logging
from berth.config import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="berth")
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="BERTH_CONFIG",
    help="berth.toml to read (default: ./berth.toml if present).",
)
@click.option(
    "--log-level",
    default="info",
    envvar="BERTH_LOG_LEVEL",
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@click.option(
    "--log-format", default="text", envvar="BERTH_LOG_FORMAT", type=click.Choice(["text", "json"])
)
@click.pass_context
def cli(ctx: click.Context, config: Path | None, log_level: str, log_format: str) -> None:
    """berth: run cloud processing services."""
    setup_logging(log_level, "json" if log_format == "json" else "text")
    if config is not None:
        # Through the environment, so components built deep inside a process
        # (the store in the control plane) and child processes (`berth up`'s)
        # all read the same file.
        os.environ["BERTH_CONFIG"] = str(config.resolve())
    ctx.obj = {"config_file": config}


for module in (server, store, gateway, scheduler, services, up):
    for command in module.commands:
        cli.add_command(command)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"berth: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
