"""CLI commands of berth.services (owned by that component)."""

from __future__ import annotations

import click

commands: list[click.Command] = []
