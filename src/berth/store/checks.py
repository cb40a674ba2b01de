"""The store runs its services' health checks, as a Consul agent does.

HTTP and TCP checks are probed at their interval (bounded concurrency); TTL
checks turn critical when not updated in time; services whose check stayed
critical longer than DeregisterCriticalServiceAfter are deregistered. The
runner follows the state through ``sync``, which the store calls for every
committed check change; the probes themselves only report through writes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from berth.store.model import Check, CheckSpec, Status
from berth.store.state import State, Tx

log = logging.getLogger("berth.store.checks")

R = TypeVar("R")
Writer = Callable[[Callable[[Tx], Any]], Awaitable[Any]]
MAX_OUTPUT = 4096  # Consul's default check_output_max_size
TTL_EXPIRED = "TTL expired"


def http_status(code: int) -> Status:
    """Consul's mapping: 2xx passing, 429 Too Many Requests warning, anything else critical."""
    if 200 <= code < 300:
        return "passing"
    if code == 429:
        return "warning"
    return "critical"


def reap_due(checks: list[Check], critical_since: dict[str, float], now: float) -> list[str]:
    """Service IDs whose check has been critical longer than its DeregisterCriticalServiceAfter."""
    due = []
    for check in checks:
        after = check.spec.deregister_after_s
        since = critical_since.get(check.id)
        if after > 0 and check.service_id and since is not None and now - since >= after:
            due.append(check.service_id)
    return sorted(set(due))


@dataclass(slots=True)
class Probe:
    spec: CheckSpec
    task: asyncio.Task[None]


class CheckRunner:
    def __init__(
        self, state: State, write: Writer, concurrency: int, reap_interval_s: float
    ) -> None:
        self.state = state
        self._write = write
        self._limit = asyncio.Semaphore(concurrency)
        self._reap_interval = reap_interval_s
        self._probes: dict[str, Probe] = {}
        self._ttl_timers: dict[str, asyncio.TimerHandle] = {}
        self._critical_since: dict[str, float] = {}
        self._clients: dict[bool, httpx.AsyncClient] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.probes_run = 0

    def __repr__(self) -> str:
        return (
            f"<CheckRunner probes={len(self._probes)} ttl={len(self._ttl_timers)}"
            f" critical={len(self._critical_since)} run={self.probes_run}>"
        )

    def start(self) -> None:
        for check in list(self.state.checks.values()):
            self.sync(check.id, check)
        self._reaper = asyncio.create_task(self._reap_loop())

    async def stop(self) -> None:
        for probe in self._probes.values():
            probe.task.cancel()
        tasks = [p.task for p in self._probes.values()] + list(self._tasks)
        if self._reaper is not None:
            self._reaper.cancel()
            tasks.append(self._reaper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()
        for timer in self._ttl_timers.values():
            timer.cancel()
        self._ttl_timers.clear()
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    # -- following the state -----------------------------------------------------

    def sync(self, check_id: str, check: Check | None) -> None:
        loop = asyncio.get_running_loop()
        if check is None:
            probe = self._probes.pop(check_id, None)
            if probe is not None:
                probe.task.cancel()
            timer = self._ttl_timers.pop(check_id, None)
            if timer is not None:
                timer.cancel()
            self._critical_since.pop(check_id, None)
            return
        if check.status == "critical":
            self._critical_since.setdefault(check_id, loop.time())
        else:
            self._critical_since.pop(check_id, None)
        spec = check.spec
        if spec.kind not in ("http", "tcp") and (probe := self._probes.pop(check_id, None)):
            probe.task.cancel()  # re-registered as another kind of check
        if spec.kind != "ttl" and (timer := self._ttl_timers.pop(check_id, None)):
            timer.cancel()
        if spec.kind in ("http", "tcp"):
            probe = self._probes.get(check_id)
            if probe is None or probe.spec != spec:
                if probe is not None:
                    probe.task.cancel()
                task = asyncio.create_task(self._probe_loop(check_id, spec))
                self._probes[check_id] = Probe(spec, task)
        elif spec.kind == "ttl" and check_id not in self._ttl_timers:
            self.ttl_reset(check_id)

    def ttl_reset(self, check_id: str) -> None:
        check = self.state.checks.get(check_id)
        if check is None or check.spec.kind != "ttl":
            return
        loop = asyncio.get_running_loop()
        old = self._ttl_timers.pop(check_id, None)
        if old is not None:
            old.cancel()
        self._ttl_timers[check_id] = loop.call_later(check.spec.ttl_s, self._ttl_expired, check_id)

    def _ttl_expired(self, check_id: str) -> None:
        self._ttl_timers.pop(check_id, None)
        now = asyncio.get_running_loop().time()

        def expire(tx: Tx) -> bool:
            # The write runs a loop turn later: a pass that came in between
            # re-armed the timer and must not be overwritten by this expiry.
            if check_id in self._ttl_timers:
                return False
            return tx.update_check(check_id, "critical", TTL_EXPIRED, now)

        self._spawn(self._record(check_id, expire))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, check_id: str, update: Callable[[Tx], bool]) -> None:
        try:
            await self._write(update)
        except Exception:
            log.exception("could not record the result of check %s", check_id)

    # -- probing -------------------------------------------------------------------

    async def _probe_loop(self, check_id: str, spec: CheckSpec) -> None:
        loop = asyncio.get_running_loop()
        # Checks start critical: probe soon after registration (a small stagger
        # keeps a burst of registrations from probing in lockstep).
        await asyncio.sleep(random.uniform(0, min(spec.interval_s, 0.25)))
        while True:
            async with self._limit:
                status, output = await self._probe(spec)
            self.probes_run += 1
            await self._record(check_id, _update(check_id, status, output, loop.time()))
            await asyncio.sleep(spec.interval_s)

    async def _probe(self, spec: CheckSpec) -> tuple[Status, str]:
        try:
            if spec.http:
                return await asyncio.wait_for(self._probe_http(spec), spec.timeout_s)
            return await asyncio.wait_for(self._probe_tcp(spec), spec.timeout_s)
        except TimeoutError:
            return "critical", f"{spec.http or spec.tcp}: timed out after {spec.timeout_s:g}s"
        except Exception as exc:
            # Whatever else a probe raises (a port out of range in a spec stored
            # by an older berth, a header h11 refuses) is a failed check; it must
            # not end the loop, which would freeze the check at its last status.
            return "critical", f"{spec.http or spec.tcp}: {exc!r}"

    async def _probe_http(self, spec: CheckSpec) -> tuple[Status, str]:
        client = self._clients.get(spec.tls_skip_verify)
        if client is None:
            client = httpx.AsyncClient(
                verify=not spec.tls_skip_verify, follow_redirects=True, trust_env=False
            )
            self._clients[spec.tls_skip_verify] = client
        # Bytes, as Consul sends them: httpx would refuse non-ASCII str values.
        headers = [(k.encode(), v.encode()) for k, values in spec.header.items() for v in values]
        request = client.build_request(
            spec.method,
            spec.http,
            headers=headers,
            content=spec.body.encode() if spec.body else None,
            timeout=spec.timeout_s,
        )
        try:
            resp = await client.send(request, stream=True)
            try:
                # Only the start of the body becomes the output: a health page
                # that streams megabytes must not be held in memory.
                head = b""
                async for chunk in resp.aiter_bytes():
                    head += chunk
                    if len(head) >= MAX_OUTPUT:
                        break
            finally:
                await resp.aclose()
        except httpx.HTTPError as exc:
            return "critical", f"Get {spec.http}: {exc!r}"
        text = head[:MAX_OUTPUT].decode(resp.encoding or "utf-8", errors="replace")
        return (
            http_status(resp.status_code),
            f"HTTP {spec.method} {spec.http}: {resp.status_code} {resp.reason_phrase}"
            f" Output: {text}",
        )

    async def _probe_tcp(self, spec: CheckSpec) -> tuple[Status, str]:
        host, _, port = spec.tcp.rpartition(":")
        try:
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError as exc:
            return "critical", f"dial tcp {spec.tcp}: {exc.strerror or exc!r}"
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return "passing", f"TCP connect {spec.tcp}: Success"

    # -- reaping ---------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._reap_interval)
            now = loop.time()
            for service_id in reap_due(list(self.state.checks.values()), self._critical_since, now):
                log.info(
                    "deregistering service %s: critical past DeregisterCriticalServiceAfter",
                    service_id,
                )
                try:
                    await self._write(_deregister(service_id, now))
                except Exception:
                    log.exception("could not reap service %s", service_id)


def _update(check_id: str, status: Status, output: str, now: float) -> Callable[[Tx], bool]:
    return lambda tx: tx.update_check(check_id, status, output[:MAX_OUTPUT], now)


def _deregister(service_id: str, now: float) -> Callable[[Tx], bool]:
    return lambda tx: tx.deregister_service(service_id, now)
