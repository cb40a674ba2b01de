"""The merged view of several gateway workers: pure merge logic, snapshot encoding,
and the per-worker snapshot sockets (real abstract unix sockets, in process)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket

import pytest
import uvloop

from berth.gateway.cluster import ServerStatus
from berth.gateway.metrics import LATENCY_BUCKETS, Metrics
from berth.gateway.workers import (
    AnswerState,
    Carry,
    PeerCollector,
    ServerHealth,
    SnapshotServer,
    WorkerGroup,
    WorkerSnapshot,
    merge,
    merge_server,
    query_peer,
)

OK, ERR = ServerStatus.OK, ServerStatus.ERR


def health(
    status: ServerStatus = OK,
    msg: str | None = None,
    fail_num: int = 0,
    lastmodified: float = 1000.0,
    active: int = 0,
    up: bool = True,
) -> ServerHealth:
    return ServerHealth(status, msg, fail_num, lastmodified, active, up)


def metrics(requests: int = 0, route: str = "r", seconds: float = 0.002) -> Metrics:
    m = Metrics()
    for _ in range(requests):
        m.observe_request(route, 200, seconds, 10, 20)
    return m


def snap(worker: int, m: Metrics | None = None, **servers: ServerHealth) -> WorkerSnapshot:
    return WorkerSnapshot(
        worker=worker,
        pid=1000 + worker,
        started=1.0 + worker,
        metrics=m or Metrics(),
        servers={("svc", addr.replace("_", ":")): h for addr, h in servers.items()},
    )


def total(parts: list[Metrics]) -> int:
    return sum(m.requests_total() for m in parts)


# -- Carry: totals never go down ------------------------------------------------------------------


def test_a_replaced_workers_counts_are_carried_once() -> None:
    carry = Carry(alive=lambda pid: False)
    assert total(carry.update({1: snap(1, metrics(5))}, [1])) == 0
    m = metrics(5)
    m.connections_active = 3
    carry.update({1: snap(1, m)}, [1])
    # Index 1 answers from another process: the old one's 5 are kept for good,
    # but not its open connections (a gauge).
    successor = WorkerSnapshot(worker=1, pid=2001, started=9.0, metrics=metrics(2))
    carried = carry.update({1: successor}, [1])
    assert total(carried) == 5 and carried[0].connections_active == 0
    assert total(carry.update({1: successor}, [1])) == 5  # not again


def test_a_silent_worker_stands_in_while_alive_and_retires_when_dead() -> None:
    alive = {1001: True}
    carry = Carry(alive=lambda pid: alive.get(pid, False))
    carry.update({1: snap(1, metrics(7))}, [1])
    # Silent but alive (stuck, busy): its last counters stand in for it.
    assert total(carry.update({}, [1])) == 7
    assert total(carry.update({1: snap(1, metrics(9))}, [1])) == 0  # back: its own numbers
    # Silent and gone: retired once, and a successor starts from zero on top.
    alive[1001] = False
    assert total(carry.update({}, [1])) == 9
    successor = WorkerSnapshot(worker=1, pid=2001, started=9.0, metrics=metrics(1))
    assert total(carry.update({1: successor}, [1])) == 9


def test_merge_adds_carried_counters() -> None:
    view = merge(2, [snap(0, metrics(4)), snap(1, metrics(1))], [metrics(10)])
    assert view.metrics.requests_total() == 15
    assert len(view.snapshots) == 2


# -- merge_server -------------------------------------------------------------------------------


def test_worst_status_wins_with_that_workers_msg_and_fail_num() -> None:
    merged = merge_server(
        {
            0: health(OK, active=2, lastmodified=5.0),
            1: health(ERR, "connection refused", fail_num=3, active=1, up=False),
        }
    )
    assert merged.status is ERR
    assert (merged.msg, merged.fail_num, merged.worker) == ("connection refused", 3, 1)
    assert merged.active == 3  # in-flight requests add up
    assert merged.up is False  # one worker sends it nothing
    assert merged.by_worker == {0: OK, 1: ERR}


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        (ServerStatus.OK, ServerStatus.UNCHECKED),
        (ServerStatus.UNCHECKED, ServerStatus.EJECTED),
        (ServerStatus.EJECTED, ServerStatus.UNSTABLE),
        (ServerStatus.UNSTABLE, ServerStatus.ERR),
    ],
)
def test_severity_order(better: ServerStatus, worse: ServerStatus) -> None:
    assert merge_server({0: health(worse), 1: health(better)}).status is worse
    assert merge_server({0: health(better), 1: health(worse)}).status is worse


def test_ties_go_to_more_failures_then_latest_change_then_lowest_index() -> None:
    a = health(ERR, "a", fail_num=2, lastmodified=10.0)
    b = health(ERR, "b", fail_num=5, lastmodified=1.0)
    assert merge_server({0: a, 1: b}).msg == "b"
    c = health(ERR, "c", fail_num=2, lastmodified=20.0)
    assert merge_server({0: a, 1: c}).msg == "c"
    assert merge_server({3: a, 1: a}).worker == 1


def test_one_worker_is_its_own_view() -> None:
    h = health(ServerStatus.UNCHECKED, None, fail_num=1, active=4)
    merged = merge_server({0: h})
    assert (merged.status, merged.fail_num, merged.active, merged.up) == (
        ServerStatus.UNCHECKED,
        1,
        4,
        True,
    )


# -- merge ----------------------------------------------------------------------------------------


def test_merge_sums_counters_histograms_and_gauges() -> None:
    m0, m1 = metrics(3, seconds=0.002), metrics(2, seconds=0.3)
    m0.observe_try("svc", "ok")
    m1.observe_try("svc", "ok")
    m1.observe_try("svc", "connect")
    m0.connections_active, m1.connections_active = 4, 1
    m0.connections_total, m1.connections_total = 10, 7
    view = merge(3, [snap(1, m1), snap(0, m0)])
    total = view.metrics
    assert list(total.routes) == ["r"] and total.routes["r"].statuses == {200: 5}
    assert total.tries == {"svc": {"ok": 2, "connect": 1}}
    assert (total.bytes_in, total.bytes_out) == (50, 100)
    assert (total.connections_active, total.connections_total) == (5, 17)
    counts = total.routes["r"].counts
    assert counts[LATENCY_BUCKETS.index(0.0025)] == 3
    assert counts[LATENCY_BUCKETS.index(0.5)] == 2
    assert total.routes["r"].sum == pytest.approx(3 * 0.002 + 2 * 0.3)
    # The parts are left as they were (worker 0's part is its live registry).
    assert m0.routes["r"].statuses == {200: 3}
    assert [s.worker for s in view.snapshots] == [0, 1]
    assert view.missing == [2]
    text = total.render()
    assert 'berth_gateway_requests_total{route="r",status="200"} 5' in text
    assert 'berth_gateway_request_seconds_bucket{route="r",le="+Inf"} 5' in text
    assert "berth_gateway_connections_active 5" in text


def test_merge_health_by_server_and_worker_fields() -> None:
    view = merge(
        2,
        [
            snap(0, a_1=health(OK), b_2=health(OK)),
            snap(1, a_1=health(ERR, "timeout", fail_num=1, up=False)),
        ],
    )
    a, b = view.servers[("svc", "a:1")], view.servers[("svc", "b:2")]
    assert (a.status, a.msg, a.worker) == (ERR, "timeout", 1)
    assert (b.status, b.by_worker) == (OK, {0: OK})
    assert view.missing == []


def test_merge_keeps_the_first_snapshot_of_an_index() -> None:
    view = merge(2, [snap(0, metrics(1)), snap(0, metrics(7))])
    assert view.metrics.requests_total() == 1
    assert view.missing == [1]


def test_merge_of_checks_and_store_state() -> None:
    s0 = WorkerSnapshot(0, 1, 1.0, Metrics(), checks_done=3, last_check_time=50.0)
    s1 = WorkerSnapshot(1, 2, 1.0, Metrics(), checks_done=4, last_check_time=70.0, store_up=False)
    view = merge(2, [s0, s1])
    assert (view.checks_done, view.last_check_time) == (7, 70.0)
    assert view.store_up is False and view.checker_alive is True


# -- encoding -----------------------------------------------------------------------------------


def test_metrics_snapshot_round_trip() -> None:
    m = metrics(2)
    m.observe_request("other", 502, 12.0, 0, 0)
    m.observe_try("svc", "503")
    m.access_log_dropped = 4
    back = Metrics.from_snapshot(json.loads(json.dumps(m.snapshot())))
    assert back.render() == m.render()


@pytest.mark.parametrize(
    "doc",
    [
        None,
        {},
        {"requests": [["r", "200", 1]], "latency": {}, "tries": []},
        {"requests": [], "latency": {"r": {"counts": [1], "sum": 0}}, "tries": []},
        {"requests": [["r", 200]], "latency": {}, "tries": []},
    ],
)
def test_metrics_from_snapshot_rejects_other_documents(doc: object) -> None:
    with pytest.raises(ValueError, match="not a metrics snapshot"):
        Metrics.from_snapshot(doc)


def test_worker_snapshot_round_trip() -> None:
    s = WorkerSnapshot(
        worker=1,
        pid=42,
        started=1234.5,
        metrics=metrics(3),
        servers={("svc", "[::1]:80"): health(ERR, "connection refused", 2, 99.0, 1, False)},
        ready=False,
        checks_done=9,
        last_check_time=1300.0,
        checker_alive=False,
        store_up=False,
    )
    back = WorkerSnapshot.from_json(s.to_json())
    assert back.servers == s.servers
    assert back.metrics.render() == s.metrics.render()
    assert (back.worker, back.pid, back.started, back.ready, back.checks_done) == (
        1,
        42,
        1234.5,
        False,
        9,
    )
    assert (back.last_check_time, back.checker_alive, back.store_up) == (1300.0, False, False)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b'{"worker": 1}',
        b"[" * 100_000,
        snap(1).to_json().replace(b'"ready":true', b'"ready":1'),
        snap(1, a_1=health()).to_json().replace(b'"ok"', b'"fine"'),
    ],
)
def test_worker_snapshot_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a worker snapshot"):
        WorkerSnapshot.from_json(raw)


# -- sockets ------------------------------------------------------------------------------------


@pytest.fixture
def group() -> WorkerGroup:
    return WorkerGroup(3, f"berth-gateway-test-{os.getpid()}-{secrets.token_hex(6)}")


async def test_a_worker_answers_its_snapshot(group: WorkerGroup) -> None:
    answers = SnapshotServer(group, 1, lambda: snap(1, metrics(2)).to_json())
    await answers.start()
    try:
        assert answers.state is AnswerState.LISTENING
        got = await query_peer(group.address(1), index=1)
        assert got is not None and got.metrics.requests_total() == 2
        # Asked as another index: ignored rather than counted twice.
        assert await query_peer(group.address(1), index=2) is None
    finally:
        await answers.stop()
    assert repr(answers) == "<SnapshotServer worker=1 closed>"
    # Gone with its worker: nothing lingers.
    assert await query_peer(group.address(1), index=1) is None


async def test_a_successor_takes_over_the_index_when_its_predecessor_lets_go(
    group: WorkerGroup,
) -> None:
    old = SnapshotServer(group, 2, lambda: snap(2, metrics(5)).to_json())
    await old.start()
    new = SnapshotServer(group, 2, lambda: snap(2, metrics(1)).to_json())
    await new.start()
    try:
        assert new.state is AnswerState.WAITING
        got = await query_peer(group.address(2), index=2)
        assert got is not None and got.metrics.requests_total() == 5
        await old.stop()
        async with asyncio.timeout(10):
            while new.state is not AnswerState.LISTENING:  # noqa: ASYNC110 (polls a bind)
                await asyncio.sleep(0.02)
        got = await query_peer(group.address(2), index=2)
        assert got is not None and got.metrics.requests_total() == 1
    finally:
        await old.stop()
        await new.stop()


async def test_garbage_and_silence_count_as_missing(group: WorkerGroup) -> None:
    garbage = SnapshotServer(group, 1, lambda: b"not json")
    await garbage.start()
    # A peer that accepts but never answers.
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(group.address(2))
    mute.listen(1)
    try:
        assert await query_peer(group.address(1), index=1) is None
        assert await query_peer(group.address(2), timeout=0.2, index=2) is None
        collector = PeerCollector(group, lambda: snap(0, metrics(4)), timeout=0.2)
        view = await collector.view()
        assert [s.worker for s in view.snapshots] == [0]
        assert view.missing == [1, 2]
        assert view.metrics.requests_total() == 4
    finally:
        await garbage.stop()
        mute.close()


async def test_collector_merges_every_peer(group: WorkerGroup) -> None:
    servers = [
        SnapshotServer(
            group, i, lambda i=i: snap(i, metrics(i), a_1=health(ERR if i == 2 else OK)).to_json()
        )
        for i in (1, 2)
    ]
    for s in servers:
        await s.start()
    try:
        view = await PeerCollector(group, lambda: snap(0, metrics(10), a_1=health())).view()
        assert view.missing == []
        assert view.metrics.requests_total() == 13
        merged = view.servers[("svc", "a:1")]
        assert (merged.status, merged.worker) == (ERR, 2)
    finally:
        for s in servers:
            await s.stop()


def test_sockets_on_uvloop(group: WorkerGroup) -> None:
    # The gateway runs on uvloop, whose transports differ from asyncio's.
    async def scenario() -> None:
        answers = SnapshotServer(group, 1, lambda: snap(1, metrics(3)).to_json())
        await answers.start()
        try:
            view = await PeerCollector(group, lambda: snap(0)).view()
            assert view.metrics.requests_total() == 3
            assert view.missing == [2]
        finally:
            await answers.stop()

    uvloop.run(scenario())
