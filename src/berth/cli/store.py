"""CLI commands of berth.store: ``berth kv get|put|delete|watch`` and ``berth services``.

They use ``berth.store.client.StoreClient`` like every other component, so they
work the same against ``berth server`` and a real Consul. Output follows the
``consul kv`` CLI where it has an equivalent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from berth.cli.runtime import run
from berth.store.client import DEFAULT_URL, KVEntry, StoreClient
from berth.store.errors import StoreError

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def _store_options(fn: F) -> F:
    fn = click.option(
        "--token", envvar="BERTH_TOKEN", default=None, help="API token (env BERTH_TOKEN)."
    )(fn)
    fn = click.option(
        "--store-url",
        envvar="BERTH_STORE_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The store (Consul API) to talk to (env BERTH_STORE_URL).",
    )(fn)
    return fn


class CliError(click.ClickException):
    """One line on stderr, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"berth: {self.message}", err=True)


def _run(
    store_url: str, token: str | None, work: Callable[[StoreClient], Coroutine[Any, Any, T]]
) -> T:
    # Every request would otherwise log a line at INFO over the command's output.
    logging.getLogger("httpx").setLevel(logging.WARNING)

    async def main() -> T:
        async with StoreClient(store_url, token) as client:
            return await work(client)

    try:
        return run(main())
    except StoreError as exc:
        raise CliError(str(exc)) from None


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", errors="replace")


@click.group("kv")
def kv() -> None:
    """Read and write the store's key/value data."""


@kv.command("get")
@click.argument("key")
@click.option("--recurse", is_flag=True, help="Every key under KEY, as key:value lines.")
@click.option("--keys", "keys_only", is_flag=True, help="Only key names under KEY.")
@click.option("--separator", default="/", show_default=True, help="Group --keys up to this.")
@_store_options
def kv_get(
    key: str, recurse: bool, keys_only: bool, separator: str, store_url: str, token: str | None
) -> None:
    """Print KEY's value (raw), or what is under it with --recurse / --keys."""

    async def work(client: StoreClient) -> None:
        if keys_only:
            for name in await client.kv_keys(key, separator=separator or None):
                click.echo(name)
        elif recurse:
            _, entries = await client.kv_list(key)
            for entry in entries:
                click.echo(f"{entry.key}:{_text(entry.value)}")
        else:
            found = await client.kv_get(key)
            if found is None:
                raise CliError(f"no key exists at: {key}")
            sys.stdout.buffer.write(found.value or b"")
            if found.value and not found.value.endswith(b"\n"):
                sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()

    _run(store_url, token, work)


@kv.command("put")
@click.argument("key")
@click.argument("value")
@click.option("--flags", type=click.IntRange(0, 2**64 - 1), default=None)
@click.option("--cas", type=click.IntRange(0), default=None, help="Write only at this index.")
@_store_options
def kv_put(
    key: str, value: str, flags: int | None, cas: int | None, store_url: str, token: str | None
) -> None:
    """Set KEY to VALUE; VALUE "-" reads it from stdin."""
    data = sys.stdin.buffer.read() if value == "-" else value.encode()

    async def work(client: StoreClient) -> bool:
        return await client.kv_put(key, data, flags=flags, cas=cas)

    if not _run(store_url, token, work):
        raise CliError(f"CAS failed: {key} was modified since index {cas}")
    click.echo(f"Success! Data written to: {key}")


@kv.command("delete")
@click.argument("key")
@click.option("--recurse", is_flag=True, help="Delete every key under KEY.")
@_store_options
def kv_delete(key: str, recurse: bool, store_url: str, token: str | None) -> None:
    """Delete KEY (or everything under it with --recurse)."""

    async def work(client: StoreClient) -> bool:
        return await client.kv_delete(key, recurse=recurse)

    _run(store_url, token, work)
    click.echo(f"Success! Deleted key{'s under' if recurse else ''}: {key}")


def _format_change(index: int, entries: list[KVEntry]) -> str:
    lines = [f"# index {index}: {len(entries)} key(s)"]
    lines += [f"{e.key}:{_text(e.value)}" for e in entries]
    return "\n".join(lines)


@kv.command("watch")
@click.argument("prefix", default="")
@_store_options
def kv_watch(prefix: str, store_url: str, token: str | None) -> None:
    """Print everything under PREFIX now and after every change (Ctrl-C stops)."""

    async def work(client: StoreClient) -> None:
        async for index, entries in client.watch_prefix(prefix):
            click.echo(_format_change(index, entries))

    try:
        _run(store_url, token, work)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass


@click.command("services")
@_store_options
def services(store_url: str, token: str | None) -> None:
    """Table of registered services: instances, addresses and health."""

    async def work(client: StoreClient) -> Table:
        _, names = await client.catalog_services()
        table = Table("service", "instance", "address", "tags", "health")
        for name in sorted(n for n in names if n != "consul"):
            _, instances = await client.health_service(name)
            for inst in instances:
                color = {"passing": "green", "warning": "yellow"}.get(inst.status, "red")
                table.add_row(
                    name,
                    inst.id,
                    f"{inst.address}:{inst.port}",
                    ",".join(inst.tags),
                    f"[{color}]{inst.status}[/{color}]",
                )
        return table

    table = _run(store_url, token, work)
    if table.row_count == 0:
        click.echo("no services registered")
        return
    Console().print(table)


commands: list[click.Command] = [kv, services]
