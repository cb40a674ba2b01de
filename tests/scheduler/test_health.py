"""Health checks: Marathon's counting rules (pure) and real HTTP/TCP/COMMAND probes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from berth.scheduler.health import Outcome, Probes, next_probe_in, record
from berth.scheduler.models import HealthCheck
from berth.scheduler.state import HealthResult


def test_failures_in_grace_are_ignored_until_first_success() -> None:
    result = HealthResult()
    assert not record(result, Outcome(False, "refused"), in_grace=True, when="t1")
    assert result.consecutive_failures == 0 and result.last_failure is None
    assert not record(result, Outcome(True), in_grace=True, when="t2")
    assert result.alive and result.first_success == "t2" and result.healthy
    # After a first success the grace period no longer protects.
    assert record(result, Outcome(False, "HTTP 500"), in_grace=True, when="t3")
    assert (result.alive, result.consecutive_failures, result.last_failure_cause) == (
        False,
        1,
        "HTTP 500",
    )
    assert record(result, Outcome(False, "HTTP 500"), in_grace=False, when="t4")
    assert result.consecutive_failures == 2
    record(result, Outcome(True), in_grace=False, when="t5")
    assert result.consecutive_failures == 0 and result.first_success == "t2"


def test_failures_after_grace_count_without_any_success() -> None:
    result = HealthResult()
    assert record(result, Outcome(False, "refused"), in_grace=False, when="t")
    assert result.consecutive_failures == 1 and not result.healthy


def test_ignored_1xx_changes_nothing() -> None:
    result = HealthResult(alive=True, first_success="t0")
    assert not record(result, Outcome(False, ignored=True), in_grace=False, when="t")
    assert result.alive and result.consecutive_failures == 0


def test_fast_probing_only_before_the_first_success_and_within_grace() -> None:
    check = HealthCheck(interval_seconds=60, grace_period_seconds=300)
    assert next_probe_in(check, HealthResult(), in_grace=True, initial_seconds=0.25) == 0.25
    # Never came up and the grace period is over: failures count, at Marathon's pace.
    assert next_probe_in(check, HealthResult(), in_grace=False, initial_seconds=0.25) == 60
    up = HealthResult(alive=True, first_success="t")
    assert next_probe_in(check, up, in_grace=True, initial_seconds=0.25) == 60
    assert next_probe_in(HealthCheck(interval_seconds=1), HealthResult(), True, 5) == 1


@pytest.fixture
async def probes() -> AsyncIterator[Probes]:
    p = Probes()
    yield p
    await p.close()


@pytest.fixture
async def http_server() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        status = {b"/ok": b"200 OK", b"/redirect": b"302 Found"}.get(line.split()[1], b"500 X")
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_http_probe_statuses(probes: Probes, http_server: int) -> None:
    ok = await probes.run(HealthCheck(protocol="HTTP", path="/ok"), "127.0.0.1", http_server, {})
    assert ok.alive
    redirect = HealthCheck(protocol="HTTP", path="/redirect")
    assert (await probes.run(redirect, "127.0.0.1", http_server, {})).alive
    bad = await probes.run(HealthCheck(protocol="HTTP", path="/x"), "127.0.0.1", http_server, {})
    assert not bad.alive and "HTTP 500" in bad.cause


async def test_tcp_probe(probes: Probes, http_server: int) -> None:
    assert (await probes.run(HealthCheck(protocol="TCP"), "127.0.0.1", http_server, {})).alive
    closed = await probes.run(HealthCheck(protocol="TCP"), "127.0.0.1", 1, {})
    assert not closed.alive and "TCP connect" in closed.cause


async def test_command_probe_uses_task_env_and_timeout(probes: Probes) -> None:
    check = HealthCheck(protocol="COMMAND", command='test "$PORT0" = 123')
    assert (await probes.run(check, "127.0.0.1", None, {"PORT0": "123"})).alive
    failed = await probes.run(check, "127.0.0.1", None, {"PORT0": "9"})
    assert not failed.alive and "exited with 1" in failed.cause
    slow = HealthCheck(protocol="COMMAND", command="sleep 30", timeout_seconds=1)
    timed_out = await probes.run(slow, "127.0.0.1", None, {})
    assert not timed_out.alive and "timed out" in timed_out.cause
