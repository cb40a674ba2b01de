"""CLI commands of berth.store: ``berth kv ...`` and ``berth services``."""

from __future__ import annotations

import click

commands: list[click.Command] = []
