"""``berth apps/deploy/scale/restart/tasks/kill/status`` against a real ``berth server``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from berth.cli.scheduler import CliError, health_summary, load_app_file, ui_status
from tests.scheduler.api_support import berth_cli, close_output, running_server, tiny_app
from tests.support import control_plane

# --------------------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("app", "queued", "expected"),
    [
        ({"instances": 2, "tasksRunning": 2, "deployments": [{"id": "d"}]}, None, "Deploying"),
        ({"instances": 0, "tasksRunning": 0, "deployments": []}, None, "Suspended"),
        ({"instances": 2, "tasksRunning": 2, "deployments": []}, None, "Running"),
        (
            {"instances": 2, "tasksRunning": 1, "deployments": []},
            {"delay": {"timeLeftSeconds": 4, "overdue": False}},
            "Delayed",
        ),
        (
            {"instances": 2, "tasksRunning": 1, "deployments": [{"id": "d"}]},
            {"delay": {"timeLeftSeconds": 0, "overdue": True}},
            "Waiting",
        ),
        (
            {"instances": 2, "tasksRunning": 1, "deployments": []},
            {"delay": {"timeLeftSeconds": 0, "overdue": False}},
            "Running",
        ),
    ],
)
def test_ui_status_follows_marathon_ui(
    app: dict[str, object], queued: dict[str, object] | None, expected: str
) -> None:
    assert ui_status(app, queued) == expected


def test_health_summary() -> None:
    app = {"tasksRunning": 4, "tasksHealthy": 2, "tasksUnhealthy": 1, "tasksStaged": 1}
    assert health_summary(app) == "2 healthy, 1 unhealthy, 1 unknown, 1 staged"
    assert health_summary({}) == "-"


def test_load_app_file(tmp_path: Path) -> None:
    toml = tmp_path / "app.toml"
    toml.write_text('id = "web"\ncmd = "x"\n[env]\nK = "v"\n[[healthChecks]]\nprotocol = "TCP"\n')
    assert load_app_file(toml) == {
        "id": "web",
        "cmd": "x",
        "env": {"K": "v"},
        "healthChecks": [{"protocol": "TCP"}],
    }
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CliError, match="not valid JSON"):
        load_app_file(bad)
    no_id = tmp_path / "noid.json"
    no_id.write_text('{"cmd": "x"}')
    with pytest.raises(CliError, match='needs an app "id"'):
        load_app_file(no_id)
    with pytest.raises(CliError, match="cannot read"):
        load_app_file(tmp_path / "missing.json")


# --------------------------------------------------------------------------- real


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("cli")) as proc:
        assert proc.url is not None
        yield proc.url


def _toml_app(path: Path) -> Path:
    app = tiny_app("cli", 2)
    check = app["healthChecks"][0]
    lines = [
        'id = "cli"',
        f"args = {json.dumps(app['args'])}",
        "instances = 2",
        "cpus = 0.1",
        "mem = 64",
        "taskKillGracePeriodSeconds = 1",
        "[labels]",
        'BERTH_TEST = "cli"',
        "[[healthChecks]]",
        *(f"{k} = {json.dumps(v)}" for k, v in check.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_cli_against_real_server(url: str, tmp_path: Path) -> None:
    app_file = _toml_app(tmp_path / "app.toml")
    r = berth_cli("deploy", str(app_file), url=url)
    assert r.returncode == 0, r.stderr
    assert "created /cli: 2 of 2 running, 2 healthy" in r.stdout

    r = berth_cli("apps", url=url)
    assert r.returncode == 0 and "/cli" in r.stdout and "64 MiB" in r.stdout

    r = berth_cli("status", url=url)
    assert r.returncode == 0, r.stderr
    (row,) = [line for line in r.stdout.splitlines() if line.strip().startswith("/cli")]
    assert "Running" in row and "2 of 2" in row and "2 healthy" in row
    rss = row.split()[4]  # NAME CPU "64 MiB" then RSS: measured, so never zero
    assert float(rss) > 1, row
    assert "task limits enforced by: " in r.stdout

    usage = httpx.get(url + "/api/scheduler/usage").json()
    assert usage["limits"] in ("cgroup-v2", "cgroup-v1", "rlimit")
    cli_tasks = [t for t in usage["tasks"] if t["appId"] == "/cli"]
    assert len(cli_tasks) == 2
    for task in cli_tasks:
        assert task["pid"] > 0 and task["rssBytes"] > 1 << 20 and task["cpuSeconds"] >= 0
        assert task["limits"] == usage["limits"]
        if usage["limits"].startswith("cgroup"):
            assert task["memoryLimitBytes"] == 64 << 20

    r = berth_cli("scale", "cli", "3", url=url)
    assert r.returncode == 0, r.stderr
    assert "scaled /cli: 3 of 3 running, 3 healthy" in r.stdout

    r = berth_cli("tasks", "cli", url=url)
    assert r.returncode == 0
    task_ids = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("cli.")]
    assert len(task_ids) == 3
    assert all("RUNNING" in line and "healthy" in line for line in r.stdout.splitlines()[1:])

    r = berth_cli("kill", task_ids[0], "--scale", url=url)
    assert r.returncode == 0 and "scaled down" in r.stdout

    r = berth_cli("restart", "/cli", "--force", url=url)
    assert r.returncode == 0, r.stderr
    assert "restarted /cli: 2 of 2 running" in r.stdout

    # The file is the whole definition: a label removed from it goes away.
    app_file.write_text(app_file.read_text().replace('BERTH_TEST = "cli"\n', ""))
    r = berth_cli("deploy", str(app_file), "--no-wait", url=url)
    assert r.returncode == 0 and "updated /cli: deployment" in r.stdout
    assert httpx.get(f"{url}/v2/apps/cli").json()["app"]["labels"] == {}

    r = berth_cli("tasks", url=url)
    assert r.returncode == 0 and "ENDPOINTS" in r.stdout


@pytest.mark.slow
def test_cli_errors_are_one_line(url: str, tmp_path: Path) -> None:
    r = berth_cli("scale", "nope", "2", url=url)
    assert r.returncode == 1
    assert r.stderr.strip() == "berth: App '/nope' does not exist"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"id": "bad", "cmd": "x", "instances": -1}))
    r = berth_cli("deploy", str(bad), url=url)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1
    assert "HTTP 422" in r.stderr and "/instances" in r.stderr

    r = berth_cli("kill", "no-such-task", url=url)
    assert r.returncode == 1 and "does not exist" in r.stderr

    r = berth_cli("apps", url="http://127.0.0.1:9")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "cannot reach the control plane" in r.stderr


@pytest.mark.slow
def test_cli_token(tmp_path: Path) -> None:
    proc = control_plane(tmp_path, "--token", "s3cret-token")
    try:
        url = proc.wait_ready()
        r = berth_cli("apps", url=url)
        assert r.returncode == 1 and r.stderr.strip() == "berth: HTTP 403: missing or wrong token"
        r = berth_cli("apps", "--token", "s3cret-token", url=url)
        assert r.returncode == 0, r.stderr
        r = berth_cli("status", url=url, env={"BERTH_TOKEN": "s3cret-token"})
        assert r.returncode == 0, r.stderr
    finally:
        proc.stop()
        close_output(proc)
