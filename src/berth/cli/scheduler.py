"""CLI commands of berth.scheduler: apps, deploy, scale, restart, tasks, kill, status.

They talk to the Marathon API over HTTP like any other client would, so they work
the same against ``berth server``, ``berth up`` or a real Marathon.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import click
import httpx
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:3131"
POLL_SECONDS = 0.25

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """One line on stderr, exit code 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"berth: {self.message}", err=True)


# --------------------------------------------------------------------------- HTTP


class MarathonClient:
    """Just enough of the Marathon API for the commands, with one-line errors."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def __repr__(self) -> str:
        return f"<MarathonClient {self.url}>"

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        ok_404: bool = False,
    ) -> httpx.Response:
        try:
            resp = self._http.request(method, path, params=params, json=body)
        except httpx.HTTPError as exc:
            raise CliError(
                f"cannot reach the control plane at {self.url} ({type(exc).__name__}: {exc}); "
                "is `berth server` or `berth up` running? (--url / BERTH_URL)"
            ) from None
        if resp.status_code == 404 and ok_404:
            return resp
        if resp.status_code >= 400:
            raise CliError(_error_line(resp))
        return resp

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()


def _error_line(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
    except ValueError:
        return f"HTTP {resp.status_code}: {resp.text.strip()[:200]}"
    message = str(doc.get("message", doc)) if isinstance(doc, dict) else str(doc)
    details = doc.get("details") if isinstance(doc, dict) else None
    if details:
        message += ": " + "; ".join(
            f"{d.get('path')} {', '.join(d.get('errors', []))}" for d in details
        )
    if isinstance(doc, dict) and doc.get("deployments"):
        message += " (use --force to override)"
    return f"HTTP {resp.status_code}: {message}"


def _app_path(app_id: str) -> str:
    return "/v2/apps/" + quote(app_id.strip("/"), safe="/")


def connection_options(func: F) -> F:
    @click.option(
        "--url",
        envvar="BERTH_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="Control plane (Marathon API) URL.",
    )
    @click.option("--token", envvar="BERTH_TOKEN", default=None, help="API token.")
    @functools.wraps(func)
    def wrapper(*args: Any, url: str, token: str | None, **kwargs: Any) -> Any:
        # httpx logs every request at INFO; on a terminal that is noise, not output.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        client = MarathonClient(url, token)
        try:
            return func(client, *args, **kwargs)
        finally:
            client.close()

    return wrapper  # type: ignore[return-value]


def wait_options(func: F) -> F:
    func = click.option("--force", is_flag=True, help="Override a running deployment's lock.")(func)
    func = click.option(
        "--no-wait", is_flag=True, help="Return at once instead of following the deployment."
    )(func)
    return click.option(
        "--timeout",
        type=float,
        default=300.0,
        show_default=True,
        help="Seconds to wait for the deployment.",
    )(func)


# --------------------------------------------------------------------------- status model


def ui_status(app: Mapping[str, Any], queued: Mapping[str, Any] | None) -> str:
    """Marathon UI's app status (AppsStore.processApp): deployments, then the queue."""
    if app.get("deployments"):
        status = "Deploying"
    elif app.get("instances", 0) == 0 and app.get("tasksRunning", 0) == 0:
        status = "Suspended"
    else:
        status = "Running"
    if queued is not None:
        delay = queued.get("delay") or {}
        if delay.get("overdue") is False and delay.get("timeLeftSeconds", 0) > 0:
            status = "Delayed"
        elif delay.get("overdue") is True:
            status = "Waiting"
    return status


def health_summary(app: Mapping[str, Any]) -> str:
    """healthy / unhealthy / unknown as the UI's health bar counts them."""
    running = int(app.get("tasksRunning", 0))
    healthy = int(app.get("tasksHealthy", 0))
    unhealthy = int(app.get("tasksUnhealthy", 0))
    unknown = max(running - healthy - unhealthy, 0)
    parts = [
        f"{n} {label}"
        for n, label in ((healthy, "healthy"), (unhealthy, "unhealthy"), (unknown, "unknown"))
        if n
    ]
    staged = int(app.get("tasksStaged", 0))
    if staged:
        parts.append(f"{staged} staged")
    return ", ".join(parts) or "-"


def _mem(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:g} MiB"


def _task_health(task: Mapping[str, Any]) -> str:
    results = task.get("healthCheckResults") or []
    if not results:
        return "unknown"
    if all(r.get("alive") and r.get("firstSuccess") for r in results):
        return "healthy"
    return "unhealthy"


# --------------------------------------------------------------------------- deployments


def _deployment_line(
    app_id: str, deployment: Mapping[str, Any] | None, app: Mapping[str, Any] | None
) -> str:
    parts = [app_id]
    if deployment is not None:
        actions = ", ".join(a.get("action", "") for a in deployment.get("currentActions", []))
        step = f"{deployment.get('currentStep', 0)}/{deployment.get('totalSteps', 0)}"
        parts.append(f"step {step} {actions}".rstrip())
    if app is not None:
        running = f"{app.get('tasksRunning', 0)} of {app.get('instances', 0)} running"
        parts.append(f"{running}, {health_summary(app)}")
    return " · ".join(parts)


def follow_deployment(
    client: MarathonClient,
    deployment_id: str,
    app_id: str,
    timeout: float,
) -> dict[str, Any]:
    """Show progress until the deployment leaves /v2/deployments; returns the app after."""
    console = Console(stderr=True)
    deadline = time.monotonic() + timeout
    app: dict[str, Any] | None = None
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task(f"deploying {app_id}", total=None)
        while True:
            deployments = client.get("/v2/deployments")
            current = next((d for d in deployments if d.get("id") == deployment_id), None)
            resp = client.request("GET", _app_path(app_id), ok_404=True)
            app = None if resp.status_code == 404 else dict(resp.json()["app"])
            progress.update(bar, description=_deployment_line(app_id, current, app))
            if current is None:
                break
            if time.monotonic() > deadline:
                raise CliError(
                    f"deployment {deployment_id} of {app_id} still running after {timeout:g}s "
                    "(see `berth status`)"
                )
            time.sleep(POLL_SECONDS)
    if app is None:
        raise CliError(f"deployment {deployment_id} ended and {app_id} no longer exists")
    running, wanted = int(app.get("tasksRunning", 0)), int(app.get("instances", 0))
    if running < wanted:
        raise CliError(
            f"deployment {deployment_id} ended with {running} of {wanted} tasks of {app_id} "
            "running (see `berth status` and `berth tasks`)"
        )
    return app


def _finish(
    client: MarathonClient,
    deployment_id: str,
    app_id: str,
    no_wait: bool,
    timeout: float,
    verb: str,
) -> None:
    if no_wait:
        click.echo(f"{verb} {app_id}: deployment {deployment_id} started")
        return
    app = follow_deployment(client, deployment_id, app_id, timeout)
    click.echo(
        f"{verb} {app_id}: {app.get('tasksRunning', 0)} of {app.get('instances', 0)} running, "
        f"{health_summary(app)} (deployment {deployment_id} done)"
    )


# --------------------------------------------------------------------------- commands


def load_app_file(path: Path) -> dict[str, Any]:
    """An app definition from JSON or TOML (same keys as Marathon's JSON)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".toml":
            doc: Any = tomllib.loads(raw.decode())
        else:
            doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "TOML" if path.suffix.lower() == ".toml" else "JSON"
        raise CliError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(doc, dict):
        raise CliError(f"{path} must hold one app definition (an object)")
    if not isinstance(doc.get("id"), str) or not doc["id"].strip("/"):
        raise CliError(f'{path} needs an app "id"')
    return doc


@click.command("apps")
@connection_options
def apps(client: MarathonClient) -> None:
    """List apps and their definitions."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "INSTANCES", "CPUS", "MEM", "VERSION", "CMD"):
        table.add_column(column)
    for app in client.get("/v2/apps")["apps"]:
        cmd = app.get("cmd") or " ".join(app.get("args") or [])
        if not cmd and app.get("container"):
            cmd = f"image {app['container'].get('docker', {}).get('image', '')}"
        table.add_row(
            app["id"],
            str(app.get("instances")),
            f"{app.get('cpus', 0):g}",
            _mem(app.get("mem", 0)),
            app.get("version", ""),
            cmd,
        )
    Console(width=200).print(table)


@click.command("deploy")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@wait_options
@connection_options
def deploy(client: MarathonClient, file: Path, force: bool, no_wait: bool, timeout: float) -> None:
    """Create or update the app defined in FILE (app.json or app.toml)."""
    doc = load_app_file(file)
    app_id = "/" + doc["id"].strip("/")
    existing = client.request("GET", _app_path(app_id), ok_404=True)
    if existing.status_code == 404:
        resp = client.request("POST", "/v2/apps", body=doc)
        # Marathon versions without the header name the deployment in the body only.
        deployments = resp.json().get("deployments") or [{}]
        deployment_id = resp.headers.get("Marathon-Deployment-Id") or deployments[0].get("id", "")
        verb = "created"
    else:
        # The file is the whole definition: keys removed from it must go away too.
        params = {"force": str(force).lower(), "partialUpdate": "false"}
        resp = client.request("PUT", _app_path(app_id), params=params, body=doc)
        deployment_id = resp.json()["deploymentId"]
        verb = "updated"
    _finish(client, deployment_id, app_id, no_wait, timeout, verb)


@click.command("scale")
@click.argument("app_id", metavar="APP")
@click.argument("instances", type=click.IntRange(min=0))
@wait_options
@connection_options
def scale(
    client: MarathonClient, app_id: str, instances: int, force: bool, no_wait: bool, timeout: float
) -> None:
    """Run INSTANCES tasks of APP."""
    app_id = "/" + app_id.strip("/")
    # Check first: a PUT naming a missing app would try to create it from {"instances": N}.
    if client.request("GET", _app_path(app_id), ok_404=True).status_code == 404:
        raise CliError(f"App '{app_id}' does not exist")
    resp = client.request(
        "PUT",
        _app_path(app_id),
        params={"force": str(force).lower()},
        body={"instances": instances},
    )
    _finish(client, resp.json()["deploymentId"], app_id, no_wait, timeout, "scaled")


@click.command("restart")
@click.argument("app_id", metavar="APP")
@wait_options
@connection_options
def restart(
    client: MarathonClient, app_id: str, force: bool, no_wait: bool, timeout: float
) -> None:
    """Replace every task of APP, rolling, as its upgrade strategy allows."""
    app_id = "/" + app_id.strip("/")
    resp = client.request(
        "POST", _app_path(app_id) + "/restart", params={"force": str(force).lower()}
    )
    _finish(client, resp.json()["deploymentId"], app_id, no_wait, timeout, "restarted")


@click.command("tasks")
@click.argument("app_id", metavar="[APP]", required=False)
@connection_options
def tasks(client: MarathonClient, app_id: str | None) -> None:
    """List tasks (of APP, or of every app)."""
    path = _app_path(app_id) + "/tasks" if app_id else "/v2/tasks"
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ID", "APP", "ENDPOINTS", "STATE", "HEALTH", "STARTED"):
        table.add_column(column)
    for task in sorted(
        client.get(path)["tasks"], key=lambda t: (t["appId"], t.get("stagedAt", ""))
    ):
        endpoints = ", ".join(f"{task.get('host')}:{p}" for p in task.get("ports", []))
        table.add_row(
            task["id"],
            task["appId"],
            endpoints or task.get("host", ""),
            task.get("state", "").removeprefix("TASK_"),
            _task_health(task),
            task.get("startedAt") or "-",
        )
    Console(width=200).print(table)


@click.command("kill")
@click.argument("task_id", metavar="TASK")
@click.option("--scale", "scale_down", is_flag=True, help="Also lower the app's instance count.")
@connection_options
def kill(client: MarathonClient, task_id: str, scale_down: bool) -> None:
    """Kill TASK; without --scale the scheduler replaces it."""
    resp = client.request(
        "POST",
        "/v2/tasks/delete",
        params={"scale": str(scale_down).lower()},
        body={"ids": [task_id]},
    )
    body = resp.json()
    if "deploymentId" in body:
        click.echo(f"killed {task_id} and scaled down (deployment {body['deploymentId']})")
    else:
        click.echo(f"killed {task_id}")


@click.command("status")
@connection_options
def status(client: MarathonClient) -> None:
    """Apps as Marathon's UI shows them, with the memory their tasks use now."""
    apps = client.get("/v2/apps", embed=["apps.counts", "apps.deployments"])["apps"]
    queue = {q["app"]["id"]: q for q in client.get("/v2/queue")["queue"]}
    # berth's own endpoint; a real Marathon has none, and the table shows "-" for RSS.
    resp = client.request("GET", "/api/scheduler/usage", ok_404=True)
    usage = resp.json() if resp.status_code != 404 else None
    rss: dict[str, int] = {}
    for task in usage["tasks"] if usage else []:
        rss[task["appId"]] = rss.get(task["appId"], 0) + (task["rssBytes"] or 0)
    if not apps:
        click.echo("no apps (deploy one with `berth deploy app.json`)")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NAME", "CPU", "MEMORY", "RSS", "STATUS", "RUNNING", "HEALTH"):
        table.add_column(column)
    for app in apps:
        table.add_row(
            app["id"],
            f"{app.get('cpus', 0):g}",
            _mem(app.get("mem", 0)),
            _mem(round(rss.get(app["id"], 0) / 2**20, 1)) if usage else "-",
            ui_status(app, queue.get(app["id"])),
            f"{app.get('tasksRunning', 0)} of {app.get('instances', 0)}",
            health_summary(app),
        )
    console = Console(width=200)
    console.print(table)
    if usage:
        limits = usage["limits"]
        console.print(f"task limits enforced by: {LIMITS_TEXT.get(limits, limits)}")


LIMITS_TEXT = {
    "cgroup-v2": "cgroup v2 (memory.max, cpu.max)",
    "cgroup-v1": "cgroup v1 (memory.limit_in_bytes, cpu.cfs_quota_us)",
    "rlimit": "rlimits (RLIMIT_AS from mem; no CPU quota: cgroups are not available here)",
    "none": "nothing (limits are off)",
}


commands: list[click.Command] = [apps, deploy, scale, restart, tasks, kill, status]
