"""``berth up``: the whole platform on one machine, in one command.

The control plane and the gateway run as child processes, not in this one:
each then has its own event loop and signal handling exactly as when started
alone, and the stop order (gateway drains first, then the control plane stops
its tasks) is explicit here instead of hidden in a shared loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import httpx
import psutil
from pydantic import Field

from berth import config as configuration
from berth.cli.runtime import run
from berth.config import ComponentConfig
from berth.listen import PortInUseError, bind

log = logging.getLogger("berth.up")

LISTENING = re.compile(r"listening on (http://[\w.\[\]:]+)")
ADMIN = re.compile(r"admin API on (http://[\w.\[\]:]+)")
BUILTIN_APPS = ("imageinfo", "imgprocess")


class UpConfig(ComponentConfig):
    data_dir: Path = Path("berth-data")
    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(3130, ge=0, le=65535)
    control_port: int = Field(3131, ge=0, le=65535)
    admin_port: int = Field(3132, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    instances: int = Field(2, ge=0, le=100)
    token: str | None = Field(None, min_length=8)
    timeout_ready: float = Field(120.0, gt=0)
    timeout_stop: float = Field(30.0, gt=0)


def builtin_app(name: str, instances: int) -> dict[str, Any]:
    """The Marathon app definition of a built-in processing service."""
    return {
        "id": f"/{name}",
        "args": [sys.executable, "-m", "berth.cli.main", "service", name],
        "instances": instances,
        "cpus": 1.0,
        "mem": 1024,
        "portDefinitions": [{"port": 0, "protocol": "tcp", "name": "http"}],
        # Liveness, not readiness: /health answers 503 while the instance is
        # saturated, and a busy instance must not be killed for being busy.
        "healthChecks": [
            {
                "protocol": "HTTP",
                "path": "/live",
                "portIndex": 0,
                "gracePeriodSeconds": 30,
                "intervalSeconds": 2,
                "timeoutSeconds": 2,
                "maxConsecutiveFailures": 3,
            }
        ],
        "upgradeStrategy": {"minimumHealthCapacity": 1.0, "maximumOverCapacity": 1.0},
        "labels": {"BERTH_VHOST": name},
    }


@dataclass
class Child:
    """A supervised ``berth`` subcommand whose log lines are forwarded to ours."""

    name: str
    args: Sequence[str]
    proc: asyncio.subprocess.Process | None = None
    url: str | None = None
    admin_url: str | None = None
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    lines: list[str] = field(default_factory=list)
    _pump: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<Child {self.name} pid={pid} url={self.url}>"

    async def start(self, env: dict[str, str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "berth.cli.main",
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            # Own process group: Ctrl-C in the terminal reaches only us, and
            # we stop the children in order instead of all at once.
            start_new_session=True,
        )
        self._pump = asyncio.create_task(self._forward())

    async def _forward(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines = [*self.lines[-199:], line]
            sys.stderr.write(f"[{self.name}] {line}\n")
            if self.admin_url is None and (m := ADMIN.search(line)):
                self.admin_url = m.group(1)
            elif self.url is None and (m := LISTENING.search(line)):
                self.url = m.group(1)
                self.listening.set()
        self.listening.set()

    async def wait_listening(self, timeout: float) -> str:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.listening.wait(), timeout)
        if self.url is None:
            tail = "\n".join(self.lines[-20:])
            raise click.ClickException(f"{self.name} did not start:\n{tail}")
        return self.url

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to ``timeout`` for the drain, then SIGKILL the group."""
        if self.proc is None:
            return
        descendants = _descendants(self.proc.pid)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        if self._pump is not None:
            await self._pump
        # Whatever the child started and left behind (it should leave nothing)
        # must not outlive `berth up`.
        await asyncio.to_thread(_reap, descendants, timeout)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _reap(procs: list[psutil.Process], timeout: float) -> None:
    alive = [p for p in procs if p.is_running()]
    if not alive:
        return
    log.warning("stopping %d leftover process(es)", len(alive))
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=timeout)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(still, timeout=5)


def check_ports(cfg: UpConfig) -> None:
    """Fail fast, naming the flag, before anything is started."""
    wanted = [
        (cfg.gateway_host, cfg.gateway_port, "--gateway-port"),
        ("127.0.0.1", cfg.control_port, "--control-port"),
        ("127.0.0.1", cfg.admin_port, "--admin-port"),
    ]
    for host, port, flag in wanted:
        if port == 0:
            continue
        try:
            bind(host, port).close()
        except PortInUseError:
            raise click.ClickException(
                f"port {port} is already in use (choose another with {flag})"
            ) from None


class Platform:
    def __init__(self, cfg: UpConfig) -> None:
        self.cfg = cfg
        data = str(cfg.data_dir)
        token = ["--token", cfg.token] if cfg.token else []
        self.control = Child(
            "server", ["server", "--port", str(cfg.control_port), "--data-dir", data, *token]
        )
        self.gateway = Child("gateway", [])
        self.gateway_url: str | None = None

    def __repr__(self) -> str:
        return f"<Platform control={self.control!r} gateway={self.gateway!r}>"

    async def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        await self.control.start(env)
        control_url = await self.control.wait_listening(self.cfg.timeout_ready)
        token = ["--token", self.cfg.token] if self.cfg.token else []
        self.gateway.args = [
            "gateway",
            "--host",
            self.cfg.gateway_host,
            "--port",
            str(self.cfg.gateway_port),
            "--admin-port",
            str(self.cfg.admin_port),
            "--workers",
            str(self.cfg.workers),
            "--data-dir",
            str(self.cfg.data_dir),
            "--store-url",
            control_url,
            *token,
        ]
        await self.gateway.start(env)
        self.gateway_url = await self.gateway.wait_listening(self.cfg.timeout_ready)

    async def deploy_builtins(self, client: httpx.AsyncClient) -> None:
        """Create the built-in apps unless the data dir already has them (a resume)."""
        for name in BUILTIN_APPS:
            resp = await client.get(f"/v2/apps/{name}")
            if resp.status_code == 200:
                log.info("resuming app /%s from %s", name, self.cfg.data_dir)
                continue
            resp = await client.post("/v2/apps", json=builtin_app(name, self.cfg.instances))
            if resp.status_code not in (200, 201):
                raise click.ClickException(f"deploying /{name} failed: {resp.text[:300]}")

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        """Until every built-in app is healthy and answers through the gateway."""
        assert self.gateway_url is not None
        deadline = time.monotonic() + self.cfg.timeout_ready
        gateway_port = self.gateway_url.rsplit(":", 1)[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}") as data:
            pending = set(BUILTIN_APPS)
            while pending:
                for name in sorted(pending):
                    if await _app_ready(client, data, name):
                        pending.discard(name)
                        log.info("app /%s is healthy and routed", name)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    raise click.ClickException(
                        f"apps not healthy after {self.cfg.timeout_ready:.0f}s: "
                        + ", ".join(sorted(pending))
                    )
                if not (self.control.alive() and self.gateway.alive()):
                    raise click.ClickException("a platform process exited during start")
                # No event covers "healthy and routable through the gateway"
                # end to end, so this one readiness loop polls.
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        # Stop taking traffic and drain first, then the control plane stops
        # the tasks, deregisters them and closes the store.
        await self.gateway.stop(self.cfg.timeout_stop)
        await self.control.stop(self.cfg.timeout_stop)


async def _app_ready(client: httpx.AsyncClient, data: httpx.AsyncClient, name: str) -> bool:
    try:
        resp = await client.get(f"/v2/apps/{name}")
        if resp.status_code != 200:
            return False
        app = resp.json()["app"]
        if app.get("deployments") or app.get("tasksHealthy", 0) < app.get("instances", 0):
            return False
        probe = await data.get("/health", headers={"Host": name})
        return probe.status_code == 200
    except httpx.HTTPError:
        return False


def _write_sample(data_dir: Path) -> Path:
    """A small JPEG so the printed curl example works as it is."""
    import pyvips

    path = data_dir / "sample.jpg"
    if not path.exists():
        image = pyvips.Image.xyz(640, 480)[0].linear(255 / 640, 0).cast("uchar")
        image.bandjoin([image.flip("horizontal"), image]).jpegsave(str(path), Q=85)
    return path


async def _up(cfg: UpConfig) -> None:
    check_ports(cfg)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    platform = Platform(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        bring_up = asyncio.create_task(_bring_up(platform))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({bring_up, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not bring_up.done():
            bring_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bring_up
        else:
            stopper.cancel()
            bring_up.result()
            _announce(platform, time.monotonic() - started)
            watch = asyncio.create_task(_watch_children(platform))
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait({watch, stopped}, return_when=asyncio.FIRST_COMPLETED)
            watch.cancel()
            stopped.cancel()
    finally:
        click.echo("berth: stopping (gateway drains, then tasks, then the control plane)", err=True)
        await platform.stop()
        click.echo("berth: stopped", err=True)


async def _bring_up(platform: Platform) -> None:
    await platform.start()
    assert platform.control.url is not None
    headers = {"Authorization": f"Bearer {platform.cfg.token}"} if platform.cfg.token else {}
    async with httpx.AsyncClient(
        base_url=platform.control.url, headers=headers, timeout=10
    ) as client:
        await platform.deploy_builtins(client)
        await platform.wait_ready(client)


async def _watch_children(platform: Platform) -> None:
    procs = [c.proc for c in (platform.control, platform.gateway) if c.proc is not None]
    waits = [asyncio.create_task(p.wait()) for p in procs]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    log.error("a platform process exited unexpectedly; stopping everything")


def _announce(platform: Platform, elapsed: float) -> None:
    cfg = platform.cfg
    assert platform.gateway_url and platform.control.url
    port = platform.gateway_url.rsplit(":", 1)[1]
    sample = _write_sample(cfg.data_dir)
    click.echo(
        f"""
berth is up in {elapsed:.1f}s (data in {cfg.data_dir})
  gateway        http://127.0.0.1:{port}   (route by Host: imageinfo, imgprocess)
  control plane  {platform.control.url}   (/v1 Consul API, /v2 Marathon API)
  gateway admin  {platform.gateway.admin_url or "(not started)"}/status

try:
  curl -T {sample} http://127.0.0.1:{port}/ -H "Host: imageinfo"
  curl -T {sample} http://127.0.0.1:{port}/!/fw/300/format/webp -H "Host: imgprocess" -o out.webp

Ctrl-C stops everything.
"""
    )


@click.command("up")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--gateway-port", type=int, default=None, help="Data port (default 3130).")
@click.option("--control-port", type=int, default=None, help="Control plane (default 3131).")
@click.option("--admin-port", type=int, default=None, help="Gateway admin API (default 3132).")
@click.option("--workers", type=int, default=None, help="Gateway worker processes.")
@click.option("--instances", type=int, default=None, help="Instances of each built-in app.")
@click.option("--token", default=None, help="Require this token on the APIs.")
@click.pass_obj
def up(obj: dict[str, Any], /, **flags: Any) -> None:
    """Start the whole platform and deploy the built-in services."""
    cfg = configuration.load(UpConfig, "up", flags, file=obj["config_file"])
    run(_up(cfg))


commands: list[click.Command] = [up]
