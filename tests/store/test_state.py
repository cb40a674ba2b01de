"""Fast unit tests of the pure state machine (no sockets, no clock)."""

from __future__ import annotations

import pytest

from berth.store.errors import InvalidState
from berth.store.model import Check, CheckSpec, Service, Session
from berth.store.state import State, Tx


def _session(sid: str, behavior: str = "release", delay_s: float = 0, checks=("serfHealth",)):  # type: ignore[no-untyped-def]
    return Session(sid, "", "berth", int(delay_s * 1e9), behavior, "", tuple(checks), (), 0, 0)  # type: ignore[arg-type]


def _service(sid: str, name: str = "web", tags: tuple[str, ...] = ()) -> Service:
    return Service(sid, name, tags, "", 80, {}, {"Passing": 1, "Warning": 1}, {}, False, 0, 0)


def _check(cid: str, service: Service, status: str = "critical") -> Check:
    return Check(
        cid,
        "c",
        status,
        "",
        "",
        service.id,
        service.name,
        service.tags,  # type: ignore[arg-type]
        CheckSpec(ttl_s=10),
        0,
        0,
    )


def test_fresh_state_and_index_per_write() -> None:
    st = State()
    assert st.index == 1 and st.kv_get("x") == (1, None)
    _, ch = st.write(lambda tx: tx.kv_set("a", b"1", 0))
    assert ch.index == 2 and st.index == 2 and set(ch.kv) == {"a"}
    assert ch.topics() == {"kv"}
    # A write that changes nothing takes no index.
    ok, ch = st.write(lambda tx: tx.kv_cas("a", b"2", 0, 999))
    assert ok is False and not ch and st.index == 2
    assert repr(st) == "<State index=2 keys=1 tombstones=0 sessions=0 services=0 checks=0>"


def test_entry_indexes_and_cas() -> None:
    st = State()
    st.write(lambda tx: tx.kv_set("k", b"1", 7))
    idx, e = st.kv_get("k")
    assert e is not None and (e.create_index, e.modify_index, e.flags) == (2, 2, 7) and idx == 2
    assert st.write(lambda tx: tx.kv_cas("k", b"2", 0, 0))[0] is False
    assert st.write(lambda tx: tx.kv_cas("k", b"2", 0, 2))[0] is True
    _, e = st.kv_get("k")
    assert e is not None and (e.create_index, e.modify_index, e.value) == (2, 3, b"2")
    assert st.write(lambda tx: tx.kv_cas("new", b"n", 0, 0))[0] is True


def test_prefix_index_counts_tombstones() -> None:
    st = State()
    for key in ("p/a", "p/b", "q/x"):
        st.write(lambda tx, k=key: tx.kv_set(k, b"v", 0))
    assert st.kv_list("p/")[0] == 3
    st.write(lambda tx: tx.kv_delete("p/a"))
    idx, entries = st.kv_list("p/")
    assert idx == 5 and [e.key for e in entries] == ["p/b"]
    st.write(lambda tx: tx.kv_delete_tree("p/"))
    assert st.kv_list("p/") == (6, [])
    assert st.kv_list("")[0] == st.index
    assert st.kv_keys("", "/") == (6, ["q/"])
    # Re-creating a key removes its tombstone.
    st.write(lambda tx: tx.kv_set("p/a", b"again", 0))
    assert "p/a" not in st.tombstones


def test_rollback_restores_everything() -> None:
    st = State()
    st.write(lambda tx: tx.kv_set("keep", b"1", 0))
    st.write(lambda tx: tx.kv_set("gone", b"1", 0))
    before = (dict(st.kv), dict(st.tombstones), dict(st.indexes), st.index)

    def fails(tx: Tx) -> None:
        tx.kv_set("keep", b"changed", 1)
        tx.kv_set("brand-new", b"x", 0)
        tx.kv_delete("gone")
        tx.register_service(_service("s1"), [], False, 0.0)
        raise RuntimeError("abort")

    with pytest.raises(RuntimeError):
        st.write(fails)
    assert (dict(st.kv), dict(st.tombstones), dict(st.indexes), st.index) == before
    assert list(st.keys.prefixed("")) == ["gone", "keep"]
    assert list(st.tomb_keys.prefixed("")) == []
    assert st.services == {}


def test_locks_sessions_and_lock_delay() -> None:
    st = State()
    st.write(lambda tx: tx.session_create(_session("a", delay_s=5)))
    st.write(lambda tx: tx.session_create(_session("b")))
    with pytest.raises(InvalidState):
        st.write(lambda tx: tx.kv_acquire("l", b"", 0, "nope", 0.0))
    assert st.write(lambda tx: tx.kv_acquire("l", b"a", 0, "a", 0.0))[0] is True
    assert st.write(lambda tx: tx.kv_acquire("l", b"b", 0, "b", 0.0))[0] is False
    assert st.write(lambda tx: tx.kv_release("l", b"", 0, "b"))[0] is False
    # A plain set overwrites a locked key but keeps the lock.
    st.write(lambda tx: tx.kv_set("l", b"plain", 0))
    assert st.kv["l"].session == "a"
    st.write(lambda tx: tx.session_destroy("a", 100.0))
    assert st.kv["l"].session is None and st.kv["l"].lock_index == 1
    assert st.write(lambda tx: tx.kv_acquire("l", b"b", 0, "b", 104.0))[0] is False
    assert st.write(lambda tx: tx.kv_acquire("l", b"b", 0, "b", 105.0))[0] is True
    assert st.kv["l"].lock_index == 2


def test_delete_behavior_deletes_held_keys() -> None:
    st = State()
    st.write(lambda tx: tx.session_create(_session("d", behavior="delete")))
    st.write(lambda tx: tx.kv_acquire("eph/1", b"x", 0, "d", 0.0))
    st.write(lambda tx: tx.kv_set("eph/2", b"x", 0))
    st.write(lambda tx: tx.session_destroy("d", 0.0))
    assert list(st.kv) == ["eph/2"] and "eph/1" in st.tombstones


def test_services_checks_and_session_invalidation() -> None:
    st = State()
    svc = _service("w1", tags=("a",))
    _, ch = st.write(
        lambda tx: tx.register_service(svc, [_check("c1", svc, "passing")], False, 0.0)
    )
    assert {"catalog", "svc:web", "checks"} <= ch.topics()
    st.write(lambda tx: tx.session_create(_session("s", checks=("serfHealth", "c1"))))
    # Same status and output: no write at all.
    changed, ch = st.write(lambda tx: tx.update_check("c1", "passing", "", 0.0))
    assert changed is False and not ch
    _, ch = st.write(lambda tx: tx.update_check("c1", "critical", "down", 0.0))
    assert "svc:web" in ch.topics() and "s" not in st.sessions
    with pytest.raises(InvalidState, match="critical"):
        st.write(lambda tx: tx.session_create(_session("t", checks=("c1",))))
    with pytest.raises(InvalidState, match="Missing check"):
        st.write(lambda tx: tx.session_create(_session("t", checks=("zz",))))
    # Re-registering under a new name moves the instance: both names' watchers wake.
    moved = _service("w1", name="api")
    _, ch = st.write(lambda tx: tx.register_service(moved, [], True, 0.0))
    assert {"svc:web", "svc:api"} <= ch.topics() and "c1" not in st.checks
    assert st.write(lambda tx: tx.deregister_service("w1", 0.0))[0] is True
    assert st.write(lambda tx: tx.deregister_service("w1", 0.0))[0] is False
    assert st.services == {} and st.instances("api") == []


def test_reregistering_keeps_check_state_and_identical_is_no_write() -> None:
    st = State()
    svc = _service("w1")
    st.write(lambda tx: tx.register_service(svc, [_check("c1", svc)], False, 0.0))
    st.write(lambda tx: tx.update_check("c1", "passing", "ok", 0.0))
    _, ch = st.write(lambda tx: tx.register_service(svc, [_check("c1", svc)], False, 0.0))
    assert not ch and st.checks["c1"].status == "passing"
    retagged = _service("w1", tags=("new",))
    _, ch = st.write(lambda tx: tx.register_service(retagged, [_check("c1", retagged)], False, 0.0))
    assert st.checks["c1"].status == "passing" and st.checks["c1"].service_tags == ("new",)
    assert st.services["w1"].tags == ("new",)


def test_renamed_service_keeps_its_checks_under_the_new_name() -> None:
    # A kept check must follow its service's new name: its status changes
    # have to wake the watchers of the new name, not of the old one.
    st = State()
    svc = _service("w1", name="web")
    st.write(lambda tx: tx.register_service(svc, [_check("c1", svc)], False, 0.0))
    st.write(lambda tx: tx.register_service(_service("w1", name="api"), [], False, 0.0))
    assert st.checks["c1"].service_name == "api"
    _, ch = st.write(lambda tx: tx.update_check("c1", "passing", "ok", 0.0))
    assert "svc:api" in ch.topics() and "svc:web" not in ch.topics()
    # A check ID registered again for another service moves there: both wake.
    other = _service("o1", name="db")
    _, ch = st.write(lambda tx: tx.register_service(other, [_check("c1", other)], False, 0.0))
    assert {"svc:api", "svc:db"} <= ch.topics() and st.checks["c1"].service_id == "o1"
