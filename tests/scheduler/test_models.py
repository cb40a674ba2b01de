from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest
from marathon.models.app import MarathonApp
from marathon.models.task import MarathonTask
from marathon.util import to_camel_case

from berth.scheduler import models
from berth.scheduler.models import (
    ValidationFailed,
    from_json,
    merge_app,
    normalize_id,
    parse_app,
    parse_bool,
    to_json,
    with_instances,
)
from berth.scheduler.render import (
    parse_embed,
    render_app,
    render_deployment,
    render_info,
    render_queue,
    render_task,
    render_tasks_text,
)


def client_keys(cls: type) -> set[str]:
    """The JSON keys the real marathon client's strict model constructor accepts."""
    params = inspect.signature(cls.__init__).parameters
    return {to_camel_case(n) for n in params if n != "self"}


CLIENT_APP_KEYS = client_keys(MarathonApp)
CLIENT_TASK_KEYS = client_keys(MarathonTask)


def details(exc: pytest.ExceptionInfo[ValidationFailed]) -> dict[str, list[str]]:
    return {d["path"]: d["errors"] for d in exc.value.details}


def test_defaults_follow_marathon() -> None:
    app = parse_app({"id": "imageinfo", "cmd": "python3 -m http.server $PORT0"})
    assert app.id == "/imageinfo"
    assert app.service_name == "imageinfo"
    assert (app.instances, app.cpus, app.mem, app.disk) == (1, 1.0, 128.0, 0.0)
    assert (app.backoff_seconds, app.backoff_factor, app.max_launch_delay_seconds) == (
        1.0,
        1.15,
        3600.0,
    )
    assert app.upgrade_strategy == models.UpgradeStrategy(1.0, 1.0)
    assert app.task_kill_grace_period_seconds == 3.0
    assert [p.port for p in app.port_definitions] == [0]
    assert app.version.endswith("Z") and app.version_info.last_config_change_at == app.version
    assert set(app.raw) <= CLIENT_APP_KEYS
    assert "<AppDefinition /imageinfo instances=1" in repr(app)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("myapp", "/myapp"), ("//myapp", "/myapp"), ("/a//b/", "/a/b"), ("a/b", "/a/b")],
)
def test_ids_are_normalised(raw: str, expected: str) -> None:
    assert normalize_id(raw) == expected
    assert parse_app({"id": raw, "cmd": "x"}).id == expected


@pytest.mark.parametrize("bad", ["My_App", "-x", "x-", "a/B", "/", "", "a/../b"])
def test_bad_ids_are_422_on_id(bad: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse_app({"id": bad, "cmd": "x"})
    assert "/id" in details(exc)


def test_service_name_of_nested_id() -> None:
    assert parse_app({"id": "/group/web", "cmd": "x"}).service_name == "group-web"


def test_path_id_wins_over_body() -> None:
    assert parse_app({"id": "/other", "cmd": "x"}, app_id="//mine").id == "/mine"


def test_cmd_xor_args() -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse_app({"id": "a", "cmd": "x", "args": ["y"]})
    assert "/" in details(exc)
    with pytest.raises(ValidationFailed) as exc:
        parse_app({"id": "a"})
    assert "cmd" in details(exc)["/"][0]
    app = parse_app({"id": "a", "args": ["python3", "-V"]})
    assert app.args == ("python3", "-V") and app.cmd is None


def test_container_image_is_stored_and_allows_no_cmd() -> None:
    app = parse_app({"id": "a", "container": {"type": "DOCKER", "docker": {"image": "nginx"}}})
    assert app.container_image == "nginx"
    assert app.raw["container"]["docker"]["image"] == "nginx"
    with pytest.raises(ValidationFailed) as exc:
        parse_app({"id": "a", "container": {"type": "DOCKER", "docker": {}}})
    assert "/container/docker/image" in details(exc)


@pytest.mark.parametrize("bad", ["a/../../b", "?x=1#y", "x" * 300, "a b.example", "/web"])
def test_vhost_labels_must_be_host_names(bad: str) -> None:
    # They become store keys (berth/gateway/routes/<host>); the store would refuse some
    # half-way through creating the app.
    with pytest.raises(ValidationFailed) as exc:
        parse_app({"id": "v", "cmd": "x", "labels": {"HAPROXY_0_VHOST": f"ok.example,{bad}"}})
    assert [d["path"] for d in exc.value.details] == ["/labels/HAPROXY_0_VHOST"]


def test_vhost_labels_that_are_host_names_pass() -> None:
    hosts = "img.example.com, IMAGEINFO ,,*.apps.local,api-1.test:8080,my_host"
    assert parse_app({"id": "v", "cmd": "x", "labels": {"BERTH_VHOST": hosts}}).labels


def test_every_error_is_reported_with_its_path() -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse_app(
            {
                "id": "a",
                "cmd": "x",
                "instances": -1,
                "cpus": "lots",
                "mem": True,
                "env": {"A": 1},
                "upgradeStrategy": {"minimumHealthCapacity": 2},
                "healthChecks": [{"protocol": "GOPHER"}, {"protocol": "HTTP", "portIndex": 3}],
                "bogus": 1,
            }
        )
    found = details(exc)
    assert set(found) == {
        "/instances",
        "/cpus",
        "/mem",
        "/env/A",
        "/upgradeStrategy/minimumHealthCapacity",
        "/healthChecks(0)/protocol",
        "/healthChecks(1)/portIndex",
        "/bogus",
    }
    assert "expected 0 or more" in found["/instances"][0]
    assert exc.value.body()["message"] == "Object is not valid"


def test_not_an_object() -> None:
    with pytest.raises(ValidationFailed):
        parse_app(["id"])


def test_health_checks_and_ports() -> None:
    app = parse_app(
        {
            "id": "web",
            "cmd": "x",
            "portDefinitions": [{"port": 0, "name": "http"}, {"port": 0, "protocol": "udp"}],
            "healthChecks": [
                {"protocol": "HTTP", "path": "/health", "portIndex": 1, "intervalSeconds": 2},
                {"protocol": "TCP"},
                {"protocol": "COMMAND", "command": {"value": "true"}},
            ],
        }
    )
    http, tcp, command = app.health_checks
    assert (http.path, http.port_index, http.interval_seconds) == ("/health", 1, 2)
    assert (http.grace_period_seconds, http.timeout_seconds, http.max_consecutive_failures) == (
        300,
        20,
        3,
    )
    assert tcp.protocol == "TCP" and command.command == "true"
    assert app.raw["healthChecks"][2]["command"] == {"value": "true"}
    assert [p.name for p in app.port_definitions] == ["http", None]


def test_deprecated_ports_and_empty_ports() -> None:
    assert [
        p.port for p in parse_app({"id": "a", "cmd": "x", "ports": [0, 0]}).port_definitions
    ] == [0, 0]
    assert parse_app({"id": "a", "cmd": "x", "portDefinitions": []}).port_definitions == ()
    with pytest.raises(ValidationFailed):
        parse_app({"id": "a", "cmd": "x", "portDefinitions": [{"port": 80}, {"port": 80}]})
    with pytest.raises(ValidationFailed):
        parse_app({"id": "a", "cmd": "x", "requirePorts": True})


def test_read_only_fields_are_ignored_passthrough_kept() -> None:
    app = parse_app(
        {
            "id": "a",
            "cmd": "x",
            "tasksRunning": 3,
            "tasks": [],
            "version": "2015-01-01T00:00:00.000Z",
            "constraints": [["hostname", "UNIQUE"]],
            "user": "nobody",
        }
    )
    assert "tasksRunning" not in app.raw
    assert app.raw["constraints"] == [["hostname", "UNIQUE"]]
    assert app.raw["user"] == "nobody"
    assert app.version != "2015-01-01T00:00:00.000Z"


def test_merge_partial_scaling_keeps_config_version() -> None:
    app = parse_app({"id": "a", "cmd": "x", "env": {"K": "v"}})
    scaled = merge_app(app, {"instances": 3})
    assert scaled.instances == 3 and scaled.env == {"K": "v"}
    assert scaled.version > app.version
    assert scaled.version_info.last_scaling_at == scaled.version
    assert scaled.version_info.last_config_change_at == app.version_info.last_config_change_at
    changed = merge_app(scaled, {"cmd": "y"})
    assert changed.version_info.last_config_change_at == changed.version
    assert changed.instances == 3


def test_merge_switches_cmd_and_args_and_validates() -> None:
    app = parse_app({"id": "a", "cmd": "x"})
    switched = merge_app(app, {"args": ["python3"]})
    assert switched.cmd is None and switched.args == ("python3",)
    with pytest.raises(ValidationFailed):
        merge_app(app, {"instances": -5})
    # The whole fetched app sent back (marathon client's update_app) is fine.
    again = merge_app(app, {**render_app(app), "tasksRunning": 1, "instances": 2})
    assert again.instances == 2 and again.id == "/a"


def test_with_instances() -> None:
    app = parse_app({"id": "a", "cmd": "x", "instances": 3})
    fewer = with_instances(app, 2)
    assert fewer.instances == 2 and fewer.raw["instances"] == 2
    assert fewer.version_info.last_config_change_at == app.version_info.last_config_change_at


def test_json_round_trip() -> None:
    app = parse_app(
        {
            "id": "web",
            "cmd": "x",
            "healthChecks": [{"protocol": "HTTP", "path": "/h"}],
            "labels": {"BERTH_VHOST": "web.example.com"},
            "container": {"type": "DOCKER", "docker": {"image": "nginx"}},
        }
    )
    scaled = merge_app(app, {"instances": 4})
    restored = from_json(to_json(scaled))
    assert restored == scaled


@pytest.mark.parametrize(
    ("raw", "value"), [("true", True), ("True", True), ("False", False), (None, False), ("1", True)]
)
def test_parse_bool(raw: str | None, value: bool) -> None:
    assert parse_bool(raw) is value


def test_parse_bool_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        parse_bool("maybe")


def test_parse_embed_prefixes() -> None:
    assert parse_embed(["app.tasks", "apps.counts", "group.apps.deployments", "failures", "x"]) == {
        "tasks",
        "counts",
        "deployments",
        "lastTaskFailure",
    }


class State(enum.Enum):
    RUNNING = "TASK_RUNNING"


@dataclass
class Health:
    alive: bool = True
    consecutive_failures: int = 0
    first_success: str | None = "2026-01-01T00:00:00.000Z"
    last_success: str | None = "2026-01-01T00:00:01.000Z"
    last_failure: str | None = None
    last_failure_cause: str | None = None


@dataclass
class Task:
    id: str = "a.instance-1"
    app_id: str = "/a"
    host: str = "127.0.0.1"
    ports: list[int] = field(default_factory=lambda: [10001])
    state: State = State.RUNNING
    staged_at: str = "2026-01-01T00:00:00.000Z"
    started_at: str | None = "2026-01-01T00:00:00.500Z"
    version: str = "2026-01-01T00:00:00.000Z"
    health: list[Health] = field(default_factory=lambda: [Health()])


@dataclass
class Deployment:
    id: str = "d1"
    version: str = "2026-01-01T00:00:00.000Z"
    affected_apps: list[str] = field(default_factory=lambda: ["/a"])
    steps: list[list[tuple[str, str]]] = field(
        default_factory=lambda: [[("StartApplication", "/a")], [("ScaleApplication", "/a")]]
    )
    current_step: int = 2
    total_steps: int = 2


@dataclass
class Status:
    tasks: list[Task] = field(default_factory=lambda: [Task()])
    staged: int = 0
    running: int = 1
    healthy: int = 1
    unhealthy: int = 0
    deployments: list[Deployment] = field(default_factory=lambda: [Deployment()])
    last_task_failure: dict[str, Any] | None = None


@dataclass
class Entry:
    app_id: str = "/a"
    count: int = 1
    delay_until: float | None = 110.2
    since: str = "2026-01-01T00:00:00.000Z"


def test_render_app_embeds() -> None:
    app = parse_app({"id": "a", "cmd": "x", "healthChecks": [{"protocol": "TCP"}]})
    status = Status(last_task_failure={"appId": "/a", "message": "exited 1", "cpus": 1})
    plain = render_app(app, status)
    assert "tasks" not in plain and "tasksRunning" not in plain
    full = render_app(app, status, {"tasks", "counts", "deployments", "lastTaskFailure"})
    assert set(full) <= CLIENT_APP_KEYS
    assert full["tasksRunning"] == 1 and full["tasksHealthy"] == 1
    assert full["deployments"] == [{"id": "d1"}]
    assert full["lastTaskFailure"] == {"appId": "/a", "message": "exited 1"}
    task = full["tasks"][0]
    assert set(task) <= CLIENT_TASK_KEYS
    assert task["state"] == "TASK_RUNNING" and task["servicePorts"] == [0]
    assert task["healthCheckResults"][0]["taskId"] == "a.instance-1"


def test_render_task_without_health_or_start() -> None:
    doc = render_task(Task(health=[], started_at=None))
    assert "healthCheckResults" not in doc and "startedAt" not in doc


def test_render_tasks_text() -> None:
    app = parse_app({"id": "g/a", "cmd": "x", "portDefinitions": [{"port": 10000}]})
    text = render_tasks_text([(app, [Task(), Task(ports=[10002])])])
    assert text == "g_a\t10000\t127.0.0.1:10001\t127.0.0.1:10002\t\n"


def test_render_deployment() -> None:
    doc = render_deployment(Deployment())
    assert doc["currentActions"] == [
        {"action": "ScaleApplication", "app": "/a", "readinessCheckResults": []}
    ]
    assert doc["steps"][0] == {"actions": [{"action": "StartApplication", "app": "/a"}]}
    assert (doc["currentStep"], doc["totalSteps"]) == (2, 2)


def test_render_queue_delay() -> None:
    app = parse_app({"id": "a", "cmd": "x"})
    doc = render_queue([Entry(), Entry(app_id="/gone")], {"/a": app}.get, now=100.0)
    (item,) = doc["queue"]
    assert item["delay"] == {"timeLeftSeconds": 11, "overdue": False}
    assert item["app"]["id"] == "/a"
    overdue = render_queue([Entry(delay_until=None)], {"/a": app}.get, now=100.0)
    assert overdue["queue"][0]["delay"] == {"timeLeftSeconds": 0, "overdue": True}


def test_render_info() -> None:
    doc = render_info(version="0.1.0", leader="127.0.0.1:3131", http_port=3131)
    assert doc["elected"] is True and doc["http_config"]["http_port"] == 3131


def test_merge_without_partial_replaces_definition() -> None:
    app = parse_app({"id": "a", "cmd": "x", "env": {"K": "v"}, "instances": 3})
    replaced = merge_app(app, {"cmd": "y"}, partial=False)
    assert (replaced.cmd, replaced.env, replaced.instances) == ("y", {}, 1)
    assert replaced.id == "/a" and replaced.version > app.version


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"instances": 1e300}, "/instances"),
        ({"instances": 20_000}, "/instances"),
        ({"backoffSeconds": 1e300}, "/backoffSeconds"),
        (
            {"healthChecks": [{"protocol": "TCP", "intervalSeconds": 2**40}]},
            "/healthChecks(0)/intervalSeconds",
        ),
        ({"env": {"A": "x\x00y"}}, "/env/A"),
        ({"env": {"A=B": "x"}}, "/env/A=B"),
        ({"labels": {"": "x"}}, "/labels/"),
        ({"cmd": "x\x00"}, "/cmd"),
        ({"cpus": float("nan")}, "/cpus"),
    ],
)
def test_hostile_values_are_refused(doc: dict[str, Any], path: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse_app({"id": "a", "cmd": "x", **doc})
    assert path in details(exc)


def test_nul_in_args_refused() -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse_app({"id": "a", "args": ["a\x00"]})
    assert "/args" in details(exc)


def test_redeploying_the_same_definition_is_not_a_config_change() -> None:
    doc = {"id": "a", "cmd": "x", "env": {"K": "v"}, "healthChecks": [{"protocol": "TCP"}]}
    app = parse_app(doc)
    again = merge_app(app, doc, partial=False)
    assert again.version > app.version
    assert again.version_info.last_config_change_at == app.version_info.last_config_change_at


def test_body_booleans_accept_true_and_True() -> None:
    doc = {"id": "a", "cmd": "x", "portDefinitions": [{"port": 8080}]}
    assert parse_app({**doc, "requirePorts": "True"}).require_ports is True
    assert parse_app({**doc, "requirePorts": "false"}).require_ports is False
    with pytest.raises(ValidationFailed) as exc:
        parse_app({**doc, "requirePorts": "yes please"})
    assert "/requirePorts" in details(exc)


def test_render_task_hides_checks_without_results() -> None:
    unchecked = Health(alive=False, first_success=None, last_success=None)
    assert "healthCheckResults" not in render_task(Task(health=[unchecked]))
    failed = Health(alive=False, first_success=None, last_success=None, last_failure="t")
    assert render_task(Task(health=[failed]))["healthCheckResults"][0]["alive"] is False
