"""Async client for the Consul HTTP API subset berth uses.

Every berth component talks to the store only through this client, and the
client speaks only the public protocol, so pointing ``--store-url`` at a real
Consul needs no other change.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx

from berth.store.errors import PermissionDenied, StoreRejected, StoreUnavailable

log = logging.getLogger("berth.store.client")

DEFAULT_URL = "http://127.0.0.1:3131"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KVEntry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int
    session: str | None

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> KVEntry:
        raw = doc.get("Value")
        return cls(
            key=doc["Key"],
            value=None if raw is None else base64.b64decode(raw),
            flags=int(doc.get("Flags", 0)),
            create_index=int(doc.get("CreateIndex", 0)),
            modify_index=int(doc.get("ModifyIndex", 0)),
            lock_index=int(doc.get("LockIndex", 0)),
            session=doc.get("Session") or None,
        )

    def json(self) -> Any:
        """The value decoded as JSON (berth's own keys all hold JSON)."""
        return None if self.value is None else json.loads(self.value)


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """One entry of /v1/health/service/<name>: a service instance and its check state."""

    id: str
    service: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: Mapping[str, str]
    status: Literal["passing", "warning", "critical"]

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ServiceInstance:
        svc = doc["Service"]
        checks = doc.get("Checks") or []
        statuses = {c.get("Status", "critical") for c in checks}
        status: Literal["passing", "warning", "critical"] = (
            "critical"
            if "critical" in statuses
            else "warning"
            if "warning" in statuses
            else "passing"
        )
        return cls(
            id=svc["ID"],
            service=svc["Service"],
            # An empty service address means "the node's address" in Consul.
            address=svc.get("Address") or doc.get("Node", {}).get("Address", ""),
            port=int(svc.get("Port", 0)),
            tags=tuple(svc.get("Tags") or ()),
            meta=svc.get("Meta") or {},
            status=status,
        )


class WatchRateLimiter:
    """Token bucket (burst 2) for watch loops, as Consul's client guidance asks."""

    def __init__(self, rate: float = 10.0, burst: int = 2) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = time.monotonic()

    def delay(self) -> float:
        """Take a token; return how long to wait first (0 when one was available)."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def next_index(previous: int, returned: int) -> int:
    """The index to block on next; reset when the store's index went backwards.

    Consul: an index that goes backwards (snapshot restore, deleted newest key)
    must restart the watch from 0, and an index below 1 is never used.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


class StoreClient:
    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        retry_max_delay: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {"X-Consul-Token": token} if token else {}
        self._timeout = timeout
        self._retry_max_delay = retry_max_delay
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    def __repr__(self) -> str:
        return f"<StoreClient {self.url}>"

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        body: Any = None,
        timeout: float | None = None,
        ok: Sequence[int] = (200,),
    ) -> httpx.Response:
        if body is not None:
            content = json.dumps(body).encode()
        try:
            resp = await self._http.request(
                method, path, params=params, content=content, timeout=timeout or self._timeout
            )
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"{method} {self.url}{path}: {exc!r}") from exc
        if resp.status_code in ok:
            return resp
        message = resp.text.strip()[:500]
        if resp.status_code == 403:
            raise PermissionDenied(403, message or "permission denied")
        # 429 is Consul's "over your rate or connection limit": retry later.
        if resp.status_code >= 500 or resp.status_code == 429:
            raise StoreUnavailable(f"{method} {path}: {resp.status_code} {message}")
        raise StoreRejected(resp.status_code, message)

    # -- KV ----------------------------------------------------------------

    async def kv_get(self, key: str) -> KVEntry | None:
        resp = await self._request("GET", f"/v1/kv/{_path(key)}", ok=(200, 404))
        if resp.status_code == 404:
            return None
        return KVEntry.from_json(resp.json()[0])

    async def kv_list(
        self, prefix: str, *, index: int = 0, wait: str | None = None
    ) -> tuple[int, list[KVEntry]]:
        """All entries under ``prefix`` and the index; blocks when ``index`` > 0."""
        params: dict[str, Any] = {"recurse": ""}
        timeout = _blocking(params, index, wait)
        resp = await self._request(
            "GET", f"/v1/kv/{_path(prefix)}", params=params, ok=(200, 404), timeout=timeout
        )
        idx = int(resp.headers.get("X-Consul-Index", "0"))
        if resp.status_code == 404:
            return idx, []
        return idx, [KVEntry.from_json(d) for d in resp.json()]

    async def kv_keys(self, prefix: str, separator: str | None = None) -> list[str]:
        params: dict[str, Any] = {"keys": ""}
        if separator:
            params["separator"] = separator
        resp = await self._request("GET", f"/v1/kv/{_path(prefix)}", params=params, ok=(200, 404))
        return [] if resp.status_code == 404 else list(resp.json())

    async def kv_put(
        self,
        key: str,
        value: bytes | str,
        *,
        flags: int | None = None,
        cas: int | None = None,
        acquire: str | None = None,
        release: str | None = None,
    ) -> bool:
        params: dict[str, Any] = {}
        for name, val in (
            ("flags", flags),
            ("cas", cas),
            ("acquire", acquire),
            ("release", release),
        ):
            if val is not None:
                params[name] = val
        data = value.encode() if isinstance(value, str) else value
        resp = await self._request("PUT", f"/v1/kv/{_path(key)}", params=params, content=data)
        return bool(resp.json())

    async def kv_put_json(self, key: str, doc: Any, *, cas: int | None = None) -> bool:
        return await self.kv_put(key, json.dumps(doc, separators=(",", ":")), cas=cas)

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        params: dict[str, Any] = {}
        if recurse:
            params["recurse"] = ""
        if cas is not None:
            params["cas"] = cas
        resp = await self._request("DELETE", f"/v1/kv/{_path(key)}", params=params)
        return bool(resp.json())

    async def txn(self, ops: Sequence[Mapping[str, Any]]) -> tuple[bool, Any]:
        """Run a /v1/txn; returns (committed, body). A rollback is (False, errors)."""
        resp = await self._request("PUT", "/v1/txn", body=list(ops), ok=(200, 409))
        doc = resp.json()
        if resp.status_code == 409:
            return False, doc.get("Errors")
        return True, doc.get("Results")

    # -- agent / health / catalog -----------------------------------------------

    async def register_service(
        self,
        name: str,
        *,
        service_id: str | None = None,
        address: str = "",
        port: int = 0,
        tags: Sequence[str] = (),
        meta: Mapping[str, str] | None = None,
        check: Mapping[str, Any] | None = None,
    ) -> None:
        doc: dict[str, Any] = {
            "Name": name,
            "ID": service_id or name,
            "Address": address,
            "Port": port,
            "Tags": list(tags),
            "Meta": dict(meta or {}),
        }
        if check is not None:
            doc["Check"] = dict(check)
        await self._request("PUT", "/v1/agent/service/register", body=doc)

    async def deregister_service(self, service_id: str) -> None:
        await self._request("PUT", f"/v1/agent/service/deregister/{_segment(service_id)}")

    async def health_service(
        self,
        name: str,
        *,
        passing: bool = False,
        index: int = 0,
        wait: str | None = None,
    ) -> tuple[int, list[ServiceInstance]]:
        params: dict[str, Any] = {}
        if passing:
            params["passing"] = ""
        timeout = _blocking(params, index, wait)
        resp = await self._request(
            "GET", f"/v1/health/service/{_segment(name)}", params=params, timeout=timeout
        )
        idx = int(resp.headers.get("X-Consul-Index", "0"))
        return idx, [ServiceInstance.from_json(d) for d in resp.json()]

    async def catalog_services(
        self, *, index: int = 0, wait: str | None = None
    ) -> tuple[int, dict[str, list[str]]]:
        params: dict[str, Any] = {}
        timeout = _blocking(params, index, wait)
        resp = await self._request("GET", "/v1/catalog/services", params=params, timeout=timeout)
        return int(resp.headers.get("X-Consul-Index", "0")), dict(resp.json())

    async def agent_services(self) -> dict[str, Any]:
        return dict((await self._request("GET", "/v1/agent/services")).json())

    async def check_update(
        self, check_id: str, status: Literal["pass", "warn", "fail"], note: str = ""
    ) -> None:
        params = {"note": note} if note else None
        await self._request("PUT", f"/v1/agent/check/{status}/{_segment(check_id)}", params=params)

    # -- sessions -----------------------------------------------------------------

    async def session_create(
        self,
        *,
        name: str = "",
        ttl: str | None = "15s",
        behavior: Literal["release", "delete"] = "release",
        lock_delay: str = "15s",
    ) -> str:
        doc: dict[str, Any] = {"Name": name, "Behavior": behavior, "LockDelay": lock_delay}
        if ttl:
            doc["TTL"] = ttl
            # berth's sessions are tied to their TTL, not to a node health check.
            doc["NodeChecks"] = []
        resp = await self._request("PUT", "/v1/session/create", body=doc)
        return str(resp.json()["ID"])

    async def session_renew(self, session_id: str) -> bool:
        """Renew; False when the session no longer exists (it was invalidated)."""
        resp = await self._request(
            "PUT", f"/v1/session/renew/{_segment(session_id)}", ok=(200, 404)
        )
        return resp.status_code == 200

    async def session_destroy(self, session_id: str) -> None:
        await self._request("PUT", f"/v1/session/destroy/{_segment(session_id)}")

    # -- watches ----------------------------------------------------------------

    def watch_prefix(
        self, prefix: str, *, wait: str = "5m"
    ) -> AsyncIterator[tuple[int, list[KVEntry]]]:
        """Yield the entries under ``prefix`` now and after every change, forever."""
        return self._watch(
            f"kv {prefix}", lambda index: self.kv_list(prefix, index=index, wait=wait)
        )

    def watch_service(
        self, name: str, *, passing: bool = True, wait: str = "5m"
    ) -> AsyncIterator[tuple[int, list[ServiceInstance]]]:
        """Yield the instances of service ``name`` now and after every change."""
        return self._watch(
            f"service {name}",
            lambda index: self.health_service(name, passing=passing, index=index, wait=wait),
        )

    async def _watch(
        self, what: str, query: Callable[[int], Awaitable[tuple[int, T]]]
    ) -> AsyncIterator[tuple[int, T]]:
        """The blocking-query loop behind every watch.

        Survives store restarts (backoff with jitter) and index resets, and is
        rate-limited so a misbehaving store cannot make it spin. Yields only
        when the result differs: a blocking query may return without a change.
        """
        index = 0
        limiter = WatchRateLimiter()
        backoff = Backoff(self._retry_max_delay)
        last: T | None = None
        while True:
            if (delay := limiter.delay()) > 0:
                await asyncio.sleep(delay)
            try:
                returned, result = await query(index)
            except (StoreUnavailable, httpx.HTTPError) as exc:
                log.warning("watch %s: store unavailable (%s); retrying", what, exc)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            index = next_index(index, returned)
            if result != last:
                last = result
                yield returned, result


def _path(key: str) -> str:
    # Percent-encode so "?", "#", "%" and control characters stay part of the
    # key (the store then judges the key, instead of httpx refusing the URL),
    # and "." / ".." segments too: httpx would otherwise resolve them and write
    # "a/../b" to "b" instead of letting the store refuse it.
    segments = quote(key, safe="/").split("/")
    return "/".join(s.replace(".", "%2E") if s in (".", "..") else s for s in segments)


def _segment(name: str) -> str:
    return quote(name, safe=":")


class Backoff:
    """Exponential backoff with full jitter, capped."""

    def __init__(self, cap: float = 5.0, base: float = 0.1) -> None:
        self.cap = cap
        self.base = base
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return random.uniform(delay / 2, delay)

    def reset(self) -> None:
        self.attempt = 0


def _blocking(params: dict[str, Any], index: int, wait: str | None) -> float | None:
    """Add ``index`` and ``wait`` to a read's params; the HTTP timeout it needs
    (None, the client's default, when the read does not block)."""
    if index <= 0:
        return None
    params["index"] = index
    if wait:
        params["wait"] = wait
    # The server may hold the request for wait + wait/16 jitter; allow margin.
    seconds = parse_duration(wait) if wait else 300.0
    return seconds + seconds / 16 + 10.0


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Parse a Go duration ("10s", "1m30s", "250ms") into seconds; ValueError if malformed."""
    text = text.strip()
    if text in ("0", ""):
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)
