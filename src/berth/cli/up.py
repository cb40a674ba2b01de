"""CLI commands of berth up: the whole platform in one command."""

from __future__ import annotations

import click

commands: list[click.Command] = []
