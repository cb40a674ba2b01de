"""Fast unit tests: definitions parsing, key rules, watch hub, check decisions, persistence."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from berth.store.checks import CheckRunner, http_status, reap_due
from berth.store.definitions import parse_service, parse_session
from berth.store.errors import BadRequest
from berth.store.keys import key_problem
from berth.store.model import Check, CheckSpec, Entry, Service, Session
from berth.store.persist import Persistence
from berth.store.sessions import SessionTimers
from berth.store.state import State
from berth.store.watch import WatchHub


def test_parse_service_folds_keys_and_defaults() -> None:
    svc, checks = parse_service(
        {
            "name": "web",
            "Tags": ["x"],
            "META": {"Keep_Case": "v"},
            "checks": [
                {"http": "http://127.0.0.1:1/h", "interval": "0.1s", "timeout": "1s"},
                {"TTL": "15s", "deregister_critical_service_after": "10s"},
            ],
        },
        deregister_min_s=60,
    )
    assert svc.id == "web" and svc.meta == {"Keep_Case": "v"}
    assert [c.id for c in checks] == ["service:web:1", "service:web:2"]
    assert checks[0].spec.interval_s == 1.0  # raised to Consul's minimum
    assert checks[0].status == "critical" and checks[0].spec.kind == "http"
    assert checks[1].spec.deregister_after_s == 60  # Consul's floor of 1m


def test_parse_service_rejects_duplicates_and_bad_headers() -> None:
    with pytest.raises(BadRequest, match="Duplicate"):
        parse_service(
            {"Name": "a", "Checks": [{"ID": "x", "TTL": "1s"}, {"ID": "x", "TTL": "1s"}]},
            deregister_min_s=0,
        )
    with pytest.raises(BadRequest, match="Header"):
        parse_service(
            {"Name": "a", "Check": {"HTTP": "http://h/", "Interval": "1s", "Header": {"a": "b"}}},
            deregister_min_s=0,
        )


def test_parse_check_timeout_defaults_when_not_positive() -> None:
    # Consul uses its 10s default for any Timeout that is not > 0.
    _, [check] = parse_service(
        {"Name": "a", "Check": {"HTTP": "http://h/", "Interval": "1s", "Timeout": "0s"}},
        deregister_min_s=0,
    )
    assert check.spec.timeout_s == 10.0
    _, [check] = parse_service(
        {"Name": "a", "Check": {"HTTP": "http://h/", "Interval": "1s", "Timeout": -5}},
        deregister_min_s=0,
    )
    assert check.spec.timeout_s == 10.0


async def test_probe_failure_of_any_kind_is_critical() -> None:
    """A probe that raises something unexpected reports critical instead of
    ending its loop (a spec persisted by an older berth is not re-validated)."""

    async def write(fn: object) -> None:
        return None

    runner = CheckRunner(State(), write, 1, 60.0)
    try:
        for spec in (
            CheckSpec(tcp="127.0.0.1:99999", interval_s=1, timeout_s=5),
            CheckSpec(http="http://127.0.0.1:99999/", interval_s=1, timeout_s=5),
        ):
            status, output = await runner._probe(spec)
            assert status == "critical" and "99999" in output, output
    finally:
        await runner.stop()


async def test_ttl_pass_in_the_turn_the_timer_fires_wins() -> None:
    st = State()
    svc = Service("w1", "web", (), "", 0, {}, {}, {}, False, 0, 0)
    check = Check("c", "c", "passing", "", "", "w1", "web", (), CheckSpec(ttl_s=30), 0, 0)
    st.write(lambda tx: tx.register_service(svc, [check], False, 0.0))

    async def write(fn: Any) -> Any:
        return st.write(fn)[0]

    runner = CheckRunner(st, write, 1, 60.0)
    runner.start()
    try:
        runner._ttl_expired("c")  # the TTL timer fires...
        # ...and in the same loop turn a pass arrives (what the handler does).
        runner.ttl_reset("c")
        st.write(lambda tx: tx.update_check("c", "passing", "fresh", 0.0))
        await asyncio.gather(*runner._tasks)
        assert (st.checks["c"].status, st.checks["c"].output) == ("passing", "fresh")
    finally:
        await runner.stop()


async def test_session_renewed_in_the_turn_its_timer_fires_survives() -> None:
    st = State()
    session = Session("s", "", "berth", 0, "release", "30s", (), (), 0, 0)
    st.write(lambda tx: tx.session_create(session))

    async def write(fn: Any) -> Any:
        return st.write(fn)[0]

    timers = SessionTimers(st, write, 2.0)
    timers.start()
    try:
        timers._expire("s")  # the TTL timer fires...
        timers.renew("s")  # ...and a renewal answered 200 in the same loop turn
        await asyncio.gather(*timers._tasks)
        assert "s" in st.sessions
    finally:
        await timers.stop()


def test_parse_session() -> None:
    s = parse_session(None, node="berth", ttl_min_s=10, ttl_max_s=86400)
    assert (s.behavior, s.lock_delay_ns, s.ttl, s.node_checks) == (
        "release",
        15_000_000_000,
        "",
        ("serfHealth",),
    )
    s = parse_session(
        {"ttl": "30s", "lockdelay": 5, "checks": [], "ServiceChecks": [{"ID": "c"}]},
        node="berth",
        ttl_min_s=10,
        ttl_max_s=86400,
    )
    assert (s.ttl, s.lock_delay_ns, s.node_checks, s.service_checks) == (
        "30s",
        5_000_000_000,
        (),
        ("c",),
    )
    with pytest.raises(BadRequest, match=r"must be between \[10s=86400s\]"):
        parse_session({"TTL": "5s"}, node="berth", ttl_min_s=10, ttl_max_s=86400)


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("a/b/c", False),
        ("a..b/.c/d.", False),
        ("ünïcode/ключ", False),
        ("a/../b", True),
        ("..", True),
        ("a/./b", True),
        ("a\\..\\b", True),
        ("a\x00b", True),
        ("a\nb", True),
        ("a\x7f", True),
        (" a", True),
        ("a\t", True),
    ],
)
def test_key_rules(key: str, bad: bool) -> None:
    assert (key_problem(key) is not None) is bad


def test_check_decisions() -> None:
    assert [http_status(c) for c in (200, 204, 299, 429, 300, 404, 500)] == [
        "passing",
        "passing",
        "passing",
        "warning",
        "critical",
        "critical",
        "critical",
    ]
    svc_checks = _checks_for_reap()
    since = {"a": 0.0, "b": 50.0}
    assert reap_due(svc_checks, since, now=100.0) == ["svc-a"]
    assert reap_due(svc_checks, since, now=200.0) == ["svc-a", "svc-b"]
    assert reap_due(svc_checks, {}, now=1000.0) == []


def _checks_for_reap() -> list[Check]:
    from berth.store.definitions import parse_check, parse_service

    svc_a, _ = parse_service({"Name": "svc-a"}, deregister_min_s=0)
    svc_b, _ = parse_service({"Name": "svc-b"}, deregister_min_s=0)
    spec = {"TTL": "1s", "DeregisterCriticalServiceAfter": "100s"}
    return [
        parse_check(
            {"ID": "a", **spec, "DeregisterCriticalServiceAfter": "60s"},
            svc_a,
            "a",
            deregister_min_s=0,
        ),
        parse_check({"ID": "b", **spec}, svc_b, "b", deregister_min_s=0),
    ]


async def test_watch_hub_wakes_only_what_changed() -> None:
    st = State()
    hub = WatchHub()
    exact = hub.prefix("app/config")
    under = hub.prefix("app/")
    elsewhere = hub.prefix("other/")
    topic = hub.topic("svc:web")
    _, ch = st.write(lambda tx: tx.kv_set("app/config/x", b"", 0))
    hub.notify([ch])
    assert exact.done() and under.done() and not elsewhere.done() and not topic.done()
    hub.release(elsewhere, "other/", None)
    assert elsewhere.cancelled()
    assert repr(hub) == "<WatchHub prefixes=0 topics=1 waiters=1 wakeups=2>"
    hub.notify_all()
    assert topic.done()
    await asyncio.sleep(0)


async def test_persistence_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    st = State()
    p = Persistence(path)
    snap = p.open()
    assert snap.index == 0 and snap.entries == []
    p.start(asyncio.get_running_loop())
    for fn in (
        lambda tx: tx.kv_set("a", b"1", 3),
        lambda tx: tx.kv_set("b", None, 0),
        lambda tx: tx.kv_delete("a"),
    ):
        _, ch = st.write(fn)
        fut = p.submit(ch)
    await fut
    await p.close()
    again = Persistence(path)
    snap = again.open()
    assert snap.index == st.index == 4
    assert [(e.key, e.value) for e in snap.entries] == [("b", None)]
    assert snap.tombstones == {"a": 4}
    loaded = State()
    loaded.load(snap.index, snap.entries, snap.tombstones, snap.objects, snap.indexes)
    assert [e.doc() for e in loaded.kv_list("")[1]] == [e.doc() for e in st.kv_list("")[1]]
    assert loaded.kv_list("")[0] == st.kv_list("")[0]
    assert isinstance(loaded.kv["b"], Entry)
    assert "commits=0" in repr(again)


async def test_synchronous_full_is_applied(tmp_path: Path) -> None:
    p = Persistence(tmp_path / "full.db", synchronous="FULL")
    p.open()
    assert p._db is not None
    assert p._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert p._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    p.start(asyncio.get_running_loop())
    await p.close()


def test_store_config_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from berth.config import ConfigError
    from berth.store.config import load_store_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "berth.toml").write_text("[store]\nwait_max_s = 60\nwait_default_s = 30\n")
    monkeypatch.setenv("BERTH_STORE_SQLITE_SYNCHRONOUS", "FULL")
    cfg = load_store_config(tmp_path / "store")
    assert (cfg.sqlite_synchronous, cfg.wait_max_s, cfg.data_dir) == (
        "FULL",
        60,
        tmp_path / "store",
    )
    (tmp_path / "berth.toml").write_text("[store]\nwait_default_s = 900\n")
    with pytest.raises(ConfigError, match="wait_default_s must not exceed wait_max_s"):
        load_store_config(tmp_path / "store")
