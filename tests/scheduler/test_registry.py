"""Catalog entries and label routes (pure parts; the store round trips are in test_core)."""

from __future__ import annotations

from berth.scheduler.models import parse_app
from berth.scheduler.registry import registration, route_doc, vhosts
from berth.scheduler.state import Task, TaskState


def make_task(ports: list[int]) -> Task:
    return Task(
        id="a_b.1",
        app_id="/a/b",
        host="127.0.0.1",
        ports=ports,
        state=TaskState.RUNNING,
        staged_at="",
        started_at=None,
        version="v",
    )


def test_registration_with_http_check_on_its_port() -> None:
    app = parse_app(
        {
            "id": "/a/b",
            "cmd": "x",
            "labels": {"team": "img", "public": ""},
            "portDefinitions": [{"port": 0}, {"port": 0}],
            "healthChecks": [{"protocol": "HTTP", "path": "/health", "portIndex": 1}],
        }
    )
    doc = registration(app, make_task([10001, 10002]))
    assert doc["name"] == "a-b" and doc["service_id"] == "a_b.1"
    assert (doc["address"], doc["port"]) == ("127.0.0.1", 10001)
    assert doc["tags"] == ["public", "team=img"]
    assert doc["meta"] == {
        "marathon_app_id": "/a/b",
        "marathon_app_version": app.version,
        "mesos_task_id": "a_b.1",
    }
    assert doc["check"]["HTTP"] == "http://127.0.0.1:10002/health"
    assert doc["check"]["Status"] == "passing"


def test_registration_without_http_check_uses_tcp() -> None:
    app = parse_app({"id": "/t", "cmd": "x", "portDefinitions": [{"port": 0}]})
    assert registration(app, make_task([10005]))["check"]["TCP"] == "127.0.0.1:10005"


def test_vhost_labels() -> None:
    labels = {"BERTH_VHOST": "img.example.com, IMAGEINFO ,", "HAPROXY_0_VHOST": "x.example"}
    assert vhosts(labels) == {"img.example.com", "imageinfo", "x.example"}
    assert vhosts({"HAPROXY_1_VHOST": "other"}) == set()
    app = parse_app({"id": "/imageinfo", "cmd": "x"})
    assert route_doc(app) == {"cluster": "imageinfo"}
