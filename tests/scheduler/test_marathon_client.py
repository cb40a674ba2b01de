"""The third-party ``marathon`` client (0.13.0) driving a real ``berth server``.

The client's models take fixed constructor keywords, so any key berth sends
that real Marathon does not is a TypeError here: these calls parsing at all is
half of what is tested.
"""

from __future__ import annotations

import collections
import collections.abc
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

# marathon 0.13.0 uses collections.Iterable, gone since Python 3.10.
collections.Iterable = collections.abc.Iterable  # type: ignore[attr-defined]

from marathon import MarathonClient  # noqa: E402
from marathon.models import MarathonApp, MarathonHealthCheck  # noqa: E402
from marathon.models.app import MarathonUpgradeStrategy  # noqa: E402
from marathon.models.events import MarathonEvent  # noqa: E402

from tests.scheduler.api_support import SERVER, running_server  # noqa: E402

pytestmark = pytest.mark.slow

EVENT_TYPES = [
    "event_stream_attached",
    "deployment_success",
    "status_update_event",
    "health_status_changed_event",
    "api_post_event",
]


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_server(tmp_path_factory.mktemp("marathon-client")) as proc:
        assert proc.url is not None
        yield proc.url


class EventReader:
    """``client.event_stream()`` read in a thread; the main thread waits with a deadline."""

    def __init__(self, client: MarathonClient) -> None:
        self.events: queue.Queue[MarathonEvent | BaseException] = queue.Queue()
        self.seen: list[MarathonEvent] = []
        self._thread = threading.Thread(target=self._read, args=(client,), daemon=True)
        self._thread.start()

    def _read(self, client: MarathonClient) -> None:
        try:
            for event in client.event_stream(event_types=EVENT_TYPES):
                self.events.put(event)
        except BaseException as exc:  # the stream ends when the server stops
            self.events.put(exc)

    def wait_for(self, event_type: str, timeout: float = 60.0, **attrs: Any) -> MarathonEvent:
        deadline = time.monotonic() + timeout
        for event in self.seen:
            if event.event_type == event_type and all(
                getattr(event, k, None) == v for k, v in attrs.items()
            ):
                return event
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                kinds = [e.event_type for e in self.seen][-20:]
                raise AssertionError(f"no {event_type} {attrs} in {timeout}s; saw {kinds}")
            try:
                item = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise AssertionError(f"event stream failed: {item!r}") from item
            self.seen.append(item)
            if item.event_type == event_type and all(
                getattr(item, k, None) == v for k, v in attrs.items()
            ):
                return item

    def join(self) -> None:
        self._thread.join(15)


def _app(instances: int = 1) -> MarathonApp:
    return MarathonApp(
        args=["python3", "-c", SERVER],
        instances=instances,
        cpus=0.1,
        mem=64,
        task_kill_grace_period_seconds=1,
        health_checks=[
            MarathonHealthCheck(
                protocol="HTTP",
                path="/",
                port_index=0,
                grace_period_seconds=30,
                interval_seconds=1,
                timeout_seconds=2,
                max_consecutive_failures=3,
            )
        ],
        upgrade_strategy=MarathonUpgradeStrategy(
            minimum_health_capacity=1.0, maximum_over_capacity=1.0
        ),
        labels={"BERTH_TEST": "compat"},
    )


def test_marathon_client_end_to_end(url: str) -> None:
    client = MarathonClient(url, timeout=30)
    assert client.ping().strip() in (b"pong", "pong")
    info = client.get_info()
    assert info.elected is True

    reader = EventReader(MarathonClient(url, timeout=None))
    reader.wait_for("event_stream_attached")

    created = client.create_app("compat", _app())
    assert created.id == "/compat"
    assert created.health_checks[0].path == "/"
    deployment_id = created.deployments[0].id
    reader.wait_for("deployment_success", id=deployment_id)
    posted = reader.wait_for("api_post_event")
    assert posted.app_definition["id"] == "/compat"

    app = client.get_app("compat", embed_tasks=True, embed_counts=True)
    assert (app.instances, app.tasks_running, app.tasks_healthy) == (1, 1, 1)
    assert app.version_info.last_config_change_at is not None
    assert app.tasks[0].health_check_results[0].alive is True
    assert any(a.id == "/compat" for a in client.list_apps(embed_tasks=True, embed_counts=True))
    assert any(a.id == "/compat" for a in client.get_group("/").apps)
    (version,) = client.list_versions("compat")
    assert client.get_version("compat", version).id == "/compat"

    # scale_app: GET, then PUT /v2/apps//compat?force=False {"instances": 3}
    scaled = client.scale_app("compat", instances=3)
    reader.wait_for("deployment_success", id=scaled["deploymentId"])
    tasks = client.list_tasks("compat")
    assert len(tasks) == 3 and all(t.state == "TASK_RUNNING" for t in tasks)
    assert all(t.started_at is not None and t.ports for t in tasks)
    assert {t.id for t in client.list_tasks()} >= {t.id for t in tasks}
    assert client.list_deployments() == [] or all(
        d.affected_apps for d in client.list_deployments()
    )
    client.list_queue()

    killed = client.kill_task("compat", tasks[0].id, scale=True)
    assert "deploymentId" in killed
    reader.wait_for("status_update_event", task_id=tasks[0].id, task_status="TASK_KILLED")
    reader.wait_for("deployment_success", id=killed["deploymentId"])
    assert client.get_app("compat").instances == 2

    restarted = client.restart_app("compat")
    reader.wait_for("deployment_success", id=restarted["deploymentId"])
    after = {t.id for t in client.list_tasks("compat")}
    assert len(after) == 2 and not after & {t.id for t in tasks}

    deleted = client.delete_app("compat")
    reader.wait_for("deployment_success", id=deleted["deploymentId"])
    assert all(a.id != "/compat" for a in client.list_apps())
    # The reader thread ends with the server; joined by the module teardown's stop.
    reader.seen.clear()


def test_marathon_client_locks_and_errors(url: str) -> None:
    from marathon.exceptions import MarathonHttpError, NotFoundError

    client = MarathonClient(url, timeout=30)
    with pytest.raises(NotFoundError):
        client.get_app("missing")
    app = _app()
    app.args = ["python3", "-c", "import time; time.sleep(600)"]
    created = client.create_app("locked", app)
    with pytest.raises(MarathonHttpError) as exc:
        client.scale_app("locked", instances=2)
    assert exc.value.status_code == 409
    client.delete_deployment(created.deployments[0].id, force=True)
    client.delete_app("locked", force=True)


def test_marathon_client_parses_queue_and_failures(url: str) -> None:
    client = MarathonClient(url, timeout=30)
    reader = EventReader(MarathonClient(url, timeout=None))
    reader.wait_for("event_stream_attached")
    crash = MarathonApp(
        cmd="exit 3", cpus=0.1, mem=32, backoff_seconds=600, port_definitions=[], instances=1
    )
    client.create_app("crash-compat", crash)
    reader.wait_for("status_update_event", app_id="/crash-compat", task_status="TASK_FAILED")

    app = client.get_app("crash-compat", embed_last_task_failure=True, embed_counts=True)
    assert app.last_task_failure.state == "TASK_FAILED"
    assert app.last_task_failure.timestamp is not None
    (item,) = [q for q in client.list_queue() if q.app.id == "/crash-compat"]
    assert item.delay.overdue is False and item.delay.time_left_seconds > 0
    assert item.count == 1
    client.delete_app("crash-compat", force=True)
