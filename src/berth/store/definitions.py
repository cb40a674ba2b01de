"""Parse service, check and session definitions the way Consul reads them.

Pure functions from a decoded JSON body to records. Keys are matched
case-insensitively and snake_case is accepted (py-consul sends ``name``,
``id``, ``checks``; the Consul docs say ``Name``, ``ID``, ``Checks``), so both
``DeregisterCriticalServiceAfter`` and ``deregister_critical_service_after``
are the same field. Meta and Header maps keep their keys verbatim.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from berth.store.client import parse_duration
from berth.store.errors import BadRequest
from berth.store.model import STATUSES, Check, CheckSpec, Service, Session

DEFAULT_WEIGHTS = {"Passing": 1, "Warning": 1}
MIN_INTERVAL_S = 1.0  # Consul raises shorter check intervals to 1s
MAX_LOCK_DELAY_S = 60.0
UNSUPPORTED_CHECKS = ("grpc", "args", "script", "dockercontainerid", "h2ping", "aliasservice")


def fold(doc: Any, where: str) -> dict[str, Any]:
    if not isinstance(doc, Mapping):
        raise BadRequest(f"{where} must be a JSON object")
    return {str(k).lower().replace("_", ""): v for k, v in doc.items()}


def _str(doc: dict[str, Any], name: str, where: str, default: str = "") -> str:
    value = doc.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest(f"{where}: {name} must be a string")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bool(doc: dict[str, Any], name: str, where: str) -> bool:
    # Consul's decoder refuses "no" or 1 for a bool; truthiness would read "no" as true.
    value = doc.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{where}: {name} must be true or false")
    return value


def _duration(doc: dict[str, Any], name: str, where: str) -> float:
    value = doc.get(name)
    if value in (None, "", 0):
        return 0.0
    if isinstance(value, bool):
        raise BadRequest(f'{where}: {name} must be a duration such as "10s"')
    if isinstance(value, int | float):
        return float(value) / 1e9  # Go's JSON encoding of time.Duration: nanoseconds
    if not isinstance(value, str):
        raise BadRequest(f'{where}: {name} must be a duration such as "10s"')
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise BadRequest(f"{where}: invalid {name} duration {value!r}") from None
    return seconds


def _str_map(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{what} must be an object of strings")
    if len(value) > 64:
        raise BadRequest(f"{what} has more than 64 pairs")
    for k, v in value.items():
        if not k or len(k) > 128 or len(v) > 512:
            raise BadRequest(f"{what} key {k!r}: keys are 1..128 chars, values up to 512")
    return dict(value)


def _tags(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise BadRequest("Tags must be a list of strings")
    return tuple(value)


def parse_service(body: Any, *, deregister_min_s: float) -> tuple[Service, list[Check]]:
    doc = fold(body, "service definition")
    name = _str(doc, "name", "service")
    if not name:
        raise BadRequest("Missing service name")
    sid = _str(doc, "id", "service") or name
    port = doc.get("port") or 0
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise BadRequest(f"Invalid service port {port!r}")
    weights = doc.get("weights")
    weights = DEFAULT_WEIGHTS if weights is None else weights
    w = fold(weights, "Weights")
    passing, warning = w.get("passing", 1), w.get("warning", 1)
    if not _is_int(passing) or not _is_int(warning) or passing < 1:
        raise BadRequest("Weights: Passing must be an integer >= 1, Warning an integer")
    tagged = doc.get("taggedaddresses")
    tagged = {} if tagged is None else tagged
    if not isinstance(tagged, Mapping):
        raise BadRequest("TaggedAddresses must be an object")
    tags = _tags(doc.get("tags"))
    service = Service(
        id=sid,
        name=name,
        tags=tags,
        address=_str(doc, "address", "service"),
        port=port,
        meta=_str_map(doc.get("meta"), "Meta"),
        weights={"Passing": passing, "Warning": warning},
        tagged_addresses=dict(tagged),
        enable_tag_override=_bool(doc, "enabletagoverride", "service"),
        create_index=0,
        modify_index=0,
    )
    raw_checks: list[Any] = []
    if doc.get("check"):
        raw_checks.append(doc["check"])
    extra = doc.get("checks")
    if extra is not None:
        if not isinstance(extra, list):
            raise BadRequest("Checks must be a list")
        raw_checks.extend(extra)
    checks = []
    for n, raw in enumerate(raw_checks, start=1):
        default_id = f"service:{sid}" if len(raw_checks) == 1 else f"service:{sid}:{n}"
        checks.append(parse_check(raw, service, default_id, deregister_min_s=deregister_min_s))
    if len({c.id for c in checks}) != len(checks):
        raise BadRequest("Duplicate check IDs in service definition")
    return service, checks


def parse_check(body: Any, service: Service, default_id: str, *, deregister_min_s: float) -> Check:
    where = f"check {default_id}"
    doc = fold(body, where)
    for kind in UNSUPPORTED_CHECKS:
        if doc.get(kind):
            raise BadRequest(f"{where}: {kind} checks are not supported; use HTTP, TCP or TTL")
    http = _str(doc, "http", where)
    tcp = _str(doc, "tcp", where)
    ttl = _duration(doc, "ttl", where)
    interval = _duration(doc, "interval", where)
    # A TTL that is not > 0 is no TTL, as in Consul (CheckType.IsTTL).
    if sum((bool(http), bool(tcp), ttl > 0)) != 1:
        raise BadRequest(f"{where}: exactly one of HTTP, TCP or TTL must be given")
    if (http or tcp) and interval <= 0:
        raise BadRequest(f"{where}: Interval must be > 0 for HTTP or TCP checks")
    # Targets are checked here: one the prober cannot even dial would only
    # ever report its error as the check's output.
    if http:
        _check_http_target(http, where)
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise BadRequest(f"{where}: TCP must be host:port with a port in 1..65535")
    header = doc.get("header") or {}
    if not isinstance(header, Mapping) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in header.values()
    ):
        raise BadRequest(f"{where}: Header must map names to lists of strings")
    status = _str(doc, "status", where, "critical")
    if status not in STATUSES:
        raise BadRequest(f"{where}: invalid Status {status!r}")
    timeout = _duration(doc, "timeout", where)
    if timeout <= 0:
        timeout = 10.0  # Consul's default, also for a zero or negative Timeout
    deregister = _duration(doc, "deregistercriticalserviceafter", where)
    if deregister:
        deregister = max(deregister, deregister_min_s)
    spec = CheckSpec(
        http=http,
        method=_str(doc, "method", where, "GET").upper() or "GET",
        header={str(k): list(v) for k, v in header.items()},
        body=_str(doc, "body", where),
        tcp=tcp,
        ttl_s=ttl,
        interval_s=max(interval, MIN_INTERVAL_S) if interval else 0.0,
        timeout_s=timeout,
        deregister_after_s=deregister,
        tls_skip_verify=_bool(doc, "tlsskipverify", where),
    )
    check_status = next(x for x in STATUSES if x == status)
    return Check(
        id=_str(doc, "checkid", where) or _str(doc, "id", where) or default_id,
        name=_str(doc, "name", where) or f"Service '{service.name}' check",
        status=check_status,
        notes=_str(doc, "notes", where),
        output="",
        service_id=service.id,
        service_name=service.name,
        service_tags=service.tags,
        spec=spec,
        create_index=0,
        modify_index=0,
    )


def _check_http_target(http: str, where: str) -> None:
    try:
        url = urlsplit(http)
        url.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as exc:
        raise BadRequest(
            f"{where}: HTTP must be an http:// or https:// URL with a valid host and port ({exc})"
        ) from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise BadRequest(f"{where}: HTTP must be an http:// or https:// URL")


def _lock_delay_s(value: Any) -> float:
    if value is None:
        return 15.0
    if isinstance(value, bool):
        raise BadRequest("Invalid LockDelay")
    if isinstance(value, int | float):
        # Consul: numbers under 1000 are seconds, larger ones nanoseconds.
        return float(value) if value < 1000 else float(value) / 1e9
    if not isinstance(value, str):
        raise BadRequest("Invalid LockDelay")
    try:
        return parse_duration(value)
    except ValueError:
        raise BadRequest(f"Invalid LockDelay {value!r}") from None


def _check_ids(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{what} must be a list")
    ids = []
    for item in value:
        if isinstance(item, str):
            ids.append(item)
        elif isinstance(item, Mapping):
            cid = fold(item, what).get("id")
            if not isinstance(cid, str):
                raise BadRequest(f"{what} entries need an ID")
            ids.append(cid)
        else:
            raise BadRequest(f"{what} must list check IDs")
    return tuple(ids)


def _format_seconds(seconds: float) -> str:
    return f"{seconds:g}s"


def parse_session(body: Any, *, node: str, ttl_min_s: float, ttl_max_s: float) -> Session:
    doc = fold(body if body is not None else {}, "session")
    behavior = _str(doc, "behavior", "session", "release") or "release"
    if behavior not in ("release", "delete"):
        raise BadRequest(f"Invalid Behavior setting {behavior!r}")
    ttl_s = _duration(doc, "ttl", "session")
    if ttl_s and not ttl_min_s <= ttl_s <= ttl_max_s:
        raise BadRequest(
            f"Invalid Session TTL '{_format_seconds(ttl_s)}', must be between "
            f"[{_format_seconds(ttl_min_s)}={_format_seconds(ttl_max_s)}]"
        )
    lock_delay = _lock_delay_s(doc.get("lockdelay"))
    if not 0 <= lock_delay <= MAX_LOCK_DELAY_S:
        raise BadRequest("LockDelay must be between 0s and 60s")
    node_checks: tuple[str, ...] = ("serfHealth",)
    if "checks" in doc or "nodechecks" in doc:
        node_checks = _check_ids(doc.get("checks") or [], "Checks") + _check_ids(
            doc.get("nodechecks") or [], "NodeChecks"
        )
    service_checks = _check_ids(doc.get("servicechecks") or [], "ServiceChecks")
    return Session(
        id=str(uuid.uuid4()),
        name=_str(doc, "name", "session"),
        node=_str(doc, "node", "session") or node,
        lock_delay_ns=int(lock_delay * 1e9),
        behavior="delete" if behavior == "delete" else "release",
        ttl=_format_seconds(ttl_s) if ttl_s else "",
        node_checks=node_checks,
        service_checks=service_checks,
        create_index=0,
        modify_index=0,
    )
