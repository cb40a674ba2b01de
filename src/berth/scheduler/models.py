"""Marathon app definitions: parse, validate, merge and persist.

Everything here is pure: the API turns request bodies into ``AppDefinition``
values, and the scheduler core persists them with :func:`to_json` /
:func:`from_json`. Field names, defaults and 422 error bodies follow
Marathon's ``types/app.raml``; the normalised JSON kept in ``raw`` uses only
keys the third-party ``marathon`` client accepts (``render.py`` adds status).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

HealthProtocol = Literal[
    "HTTP", "HTTPS", "TCP", "COMMAND", "MESOS_HTTP", "MESOS_HTTPS", "MESOS_TCP"
]
HEALTH_PROTOCOLS: tuple[str, ...] = (
    "HTTP",
    "HTTPS",
    "TCP",
    "COMMAND",
    "MESOS_HTTP",
    "MESOS_HTTPS",
    "MESOS_TCP",
)
PORT_PROTOCOLS = ("tcp", "udp", "udp,tcp", "tcp,udp")

# Marathon's PathId segment rule (state/PathId.scala).
ID_SEGMENT = re.compile(
    r"^(([a-z0-9]|[a-z0-9][a-z0-9\-]*[a-z0-9])\.)*([a-z0-9]|[a-z0-9][a-z0-9\-]*[a-z0-9])$"
)
ID_RULE = (
    "must fully match regular expression "
    "'^(([a-z0-9]|[a-z0-9][a-z0-9\\-]*[a-z0-9])\\.)*([a-z0-9]|[a-z0-9][a-z0-9\\-]*[a-z0-9])$'"
)

# Fields Marathon computes: clients send them back (marathon's update_app posts a
# whole fetched app), so they are ignored on input rather than refused.
READ_ONLY_FIELDS = frozenset(
    {
        "version",
        "versionInfo",
        "tasks",
        "tasksRunning",
        "tasksStaged",
        "tasksHealthy",
        "tasksUnhealthy",
        "deployments",
        "lastTaskFailure",
        "taskStats",
        "readinessCheckResults",
    }
)
# Marathon app fields berth stores and returns unchanged but does not act on
# (constraints, fetch... mean nothing on one machine). All are keys the
# marathon client's MarathonApp accepts.
PASSTHROUGH_FIELDS = (
    "user",
    "gpus",
    "executor",
    "constraints",
    "uris",
    "fetch",
    "storeUrls",
    "readinessChecks",
    "dependencies",
    "acceptedResourceRoles",
    "ipAddress",
    "residency",
    "secrets",
    "unreachableStrategy",
    "killSelection",
    "networks",
    "role",
    "taskRateLimit",
)
MODELLED_FIELDS = frozenset(
    {
        "id",
        "cmd",
        "args",
        "env",
        "instances",
        "cpus",
        "mem",
        "disk",
        "ports",
        "portDefinitions",
        "requirePorts",
        "healthChecks",
        "upgradeStrategy",
        "backoffSeconds",
        "backoffFactor",
        "maxLaunchDelaySeconds",
        "taskKillGracePeriodSeconds",
        "labels",
        "container",
    }
)
KNOWN_FIELDS = MODELLED_FIELDS | READ_ONLY_FIELDS | frozenset(PASSTHROUGH_FIELDS)

DEFAULT_KILL_GRACE_SECONDS = 3.0
MAX_NUMBER = 2**31 - 1
# One machine's worth: beyond this a typo (1e6) would fork-bomb the host.
MAX_INSTANCES = 10_000
LOCAL_AGENT_ID = "berth-local"


class ValidationFailed(ValueError):
    """An app definition Marathon would answer with 422; ``details`` is its body's list."""

    def __init__(self, details: list[dict[str, Any]], message: str = "Object is not valid") -> None:
        self.details = details
        self.message = message
        super().__init__(
            message + ": " + "; ".join(f"{d['path']}: {', '.join(d['errors'])}" for d in details)
        )

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "details": self.details}


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class PortDefinition:
    port: int
    protocol: str = "tcp"
    name: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    protocol: HealthProtocol = "HTTP"
    path: str = "/"
    port_index: int = 0
    port: int | None = None
    command: str | None = None
    grace_period_seconds: int = 300
    interval_seconds: int = 60
    timeout_seconds: int = 20
    max_consecutive_failures: int = 3
    delay_seconds: int = 15
    ignore_http1xx: bool = False


@dataclass(frozen=True, slots=True)
class UpgradeStrategy:
    minimum_health_capacity: float = 1.0
    maximum_over_capacity: float = 1.0


@dataclass(frozen=True, slots=True)
class VersionInfo:
    last_scaling_at: str
    last_config_change_at: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AppDefinition:
    id: str
    cmd: str | None = None
    args: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    instances: int = 1
    cpus: float = 1.0
    mem: float = 128.0
    disk: float = 0.0
    port_definitions: tuple[PortDefinition, ...] = ()
    require_ports: bool = False
    health_checks: tuple[HealthCheck, ...] = ()
    upgrade_strategy: UpgradeStrategy = field(default_factory=UpgradeStrategy)
    backoff_seconds: float = 1.0
    backoff_factor: float = 1.15
    max_launch_delay_seconds: float = 3600.0
    # berth's default; Marathon sets it per cluster.
    task_kill_grace_period_seconds: float = DEFAULT_KILL_GRACE_SECONDS
    labels: Mapping[str, str] = field(default_factory=dict)
    container_image: str | None = None
    version: str = ""
    version_info: VersionInfo = field(default_factory=lambda: VersionInfo("", ""))
    raw: Mapping[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"<AppDefinition {self.id} instances={self.instances} version={self.version}"
            f" ports={[p.port for p in self.port_definitions]}"
            f" checks={[h.protocol for h in self.health_checks]}>"
        )

    @property
    def service_name(self) -> str:
        """The store catalog's service name: "/imageinfo" -> "imageinfo", "/a/b" -> "a-b"."""
        return self.id.lstrip("/").replace("/", "-")


# --------------------------------------------------------------------------- time


def format_timestamp(moment: datetime) -> str:
    """Marathon's timestamp: UTC, milliseconds, "Z" ("2015-08-26T20:23:44.678Z")."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def now_timestamp() -> str:
    return format_timestamp(datetime.now(UTC))


def _parse_timestamp(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def next_version(previous: str | None) -> str:
    """Now, but strictly after ``previous`` so two changes in one millisecond differ."""
    current = now_timestamp()
    if previous and current <= previous:
        try:
            return format_timestamp(_parse_timestamp(previous) + timedelta(milliseconds=1))
        except ValueError:
            return current
    return current


# --------------------------------------------------------------------------- ids and flags


def normalize_id(raw: str) -> str:
    """Absolute, single-slashed, no trailing slash: "myapp//x/" -> "/myapp/x"."""
    parts = [p for p in raw.strip().split("/") if p]
    return "/" + "/".join(parts)


def id_errors(app_id: str) -> list[str]:
    if app_id == "/":
        return ["app id must not be the root group '/'"]
    bad = [seg for seg in app_id.strip("/").split("/") if not ID_SEGMENT.match(seg)]
    if bad:
        return [f"path segment {bad[0]!r} {ID_RULE}"]
    return []


def parse_bool(value: str | None, default: bool = False) -> bool:
    """Query-string booleans: "true"/"True"/"1" (the marathon client sends "True")."""
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


# --------------------------------------------------------------------------- parsing


class _Errors:
    """Collects every problem of one document so the 422 names them all at once."""

    def __init__(self) -> None:
        self.details: list[dict[str, Any]] = []

    def add(self, path: str, message: str) -> None:
        for detail in self.details:
            if detail["path"] == path:
                detail["errors"].append(message)
                return
        self.details.append({"path": path, "errors": [message]})

    def number(
        self,
        doc: Mapping[str, Any],
        key: str,
        default: float,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        integer: bool = False,
        path: str = "",
    ) -> float:
        value = doc.get(key, default)
        if value is None:
            return default
        where = f"{path}/{key}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(where, f"expected a number, got {type(value).__name__}")
            return default
        if isinstance(value, float) and not math.isfinite(value):
            self.add(where, "expected a finite number")
            return default
        if integer and value != int(value):
            self.add(where, f"expected an integer, got {value}")
            return default
        if minimum is not None and value < minimum:
            self.add(where, f"got {value}, expected {minimum:g} or more")
            return default
        # Marathon's fields are Ints; the bound also keeps every timer finite.
        limit = MAX_NUMBER if maximum is None else maximum
        if value > limit:
            self.add(where, f"got {value}, expected {limit:g} or less")
            return default
        return int(value) if integer else float(value)

    def integer(self, doc: Mapping[str, Any], key: str, default: int, **kw: Any) -> int:
        return int(self.number(doc, key, default, integer=True, **kw))

    def boolean(self, doc: Mapping[str, Any], key: str, default: bool, path: str = "") -> bool:
        value = doc.get(key, default)
        if value is None:
            return default
        if isinstance(value, str) and value.lower() in ("true", "false"):
            # Tools that stringify everything send "True"/"false"; the meaning is plain.
            return value.lower() == "true"
        if not isinstance(value, bool):
            self.add(f"{path}/{key}", f"expected true or false, got {value!r}")
            return default
        return value

    def string_map(self, doc: Mapping[str, Any], key: str) -> dict[str, str]:
        value = doc.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(f"/{key}", "expected an object of string values")
            return {}
        out: dict[str, str] = {}
        for name, item in value.items():
            if not isinstance(item, str):
                self.add(f"/{key}/{name}", f"expected a string, got {type(item).__name__}")
            elif "\0" in item or "\0" in name or not name or "=" in name:
                # They become environment variables, which cannot hold these.
                self.add(
                    f"/{key}/{name}",
                    "names must be non-empty without '=' or NUL; values without NUL",
                )
            else:
                out[str(name)] = item
        return out


# Labels whose comma-separated hosts become gateway routes (registry.py).
VHOST_LABELS = ("BERTH_VHOST", "HAPROXY_0_VHOST")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_VHOST = re.compile(rf"(\*\.)?({_LABEL}\.)*{_LABEL}(:[0-9]{{1,5}})?", re.IGNORECASE)


def _check_vhosts(labels: Mapping[str, str], errors: _Errors) -> None:
    # Each host becomes a store key berth/gateway/routes/<host>: anything but a host name
    # ("a/../b", "?x") would be refused by the store half-way through creating the app.
    for name in VHOST_LABELS:
        for host in labels.get(name, "").split(","):
            host = host.strip()
            if host and (len(host) > 253 or not _VHOST.fullmatch(host)):
                errors.add(f"/labels/{name}", f"{host[:80]!r} is not a host name")


def _parse_ports(doc: Mapping[str, Any], errors: _Errors) -> tuple[PortDefinition, ...]:
    if "portDefinitions" in doc and doc["portDefinitions"] is not None:
        raw = doc["portDefinitions"]
        key = "portDefinitions"
    elif "ports" in doc and doc["ports"] is not None:
        # Deprecated `ports: [0, 0]`, still sent by older tools.
        raw = doc["ports"]
        key = "ports"
        if isinstance(raw, list) and all(
            isinstance(p, int) and not isinstance(p, bool) for p in raw
        ):
            raw = [{"port": p} for p in raw]
    else:
        # Marathon gives a host-networked app one assigned port by default.
        return (PortDefinition(port=0, name="default"),)
    if not isinstance(raw, list):
        errors.add(f"/{key}", "expected an array")
        return ()
    result: list[PortDefinition] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        where = f"/{key}({i})"
        if not isinstance(item, dict):
            errors.add(where, "expected an object")
            continue
        port = errors.integer(item, "port", 0, minimum=0, maximum=65535, path=where)
        protocol = item.get("protocol", "tcp")
        if protocol not in PORT_PROTOCOLS:
            errors.add(f"{where}/protocol", f"must be one of {', '.join(PORT_PROTOCOLS)}")
            protocol = "tcp"
        name = item.get("name")
        if name is not None:
            if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9-]*", name):
                errors.add(f"{where}/name", "must match ^[a-z][a-z0-9-]*$")
                name = None
            elif name in names:
                errors.add(f"{where}/name", f"port name {name!r} is used twice")
            else:
                names.add(name)
        labels = item.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            errors.add(f"{where}/labels", "expected an object of string values")
            labels = {}
        result.append(PortDefinition(port=port, protocol=str(protocol), name=name, labels=labels))
    fixed = [p.port for p in result if p.port != 0]
    if len(fixed) != len(set(fixed)):
        errors.add(f"/{key}", "ports must be unique")
    return tuple(result)


def _parse_health_check(
    item: Any, where: str, port_count: int, errors: _Errors
) -> HealthCheck | None:
    if not isinstance(item, dict):
        errors.add(where, "expected an object")
        return None
    protocol = item.get("protocol", "HTTP")
    if protocol not in HEALTH_PROTOCOLS:
        errors.add(f"{where}/protocol", f"must be one of {', '.join(HEALTH_PROTOCOLS)}")
        return None
    path = item.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/"):
        errors.add(f"{where}/path", "must be an absolute path such as /health")
        path = "/"
    command = item.get("command")
    if isinstance(command, dict):
        command = command.get("value")
    if protocol == "COMMAND" and not (isinstance(command, str) and command.strip()):
        errors.add(f"{where}/command", 'a COMMAND health check needs command {"value": "..."}')
    if command is not None and not isinstance(command, str):
        errors.add(f"{where}/command", "expected a string")
        command = None
    port = item.get("port")
    if port is not None:
        port = errors.integer(item, "port", 0, minimum=1, maximum=65535, path=where)
    port_index = errors.integer(item, "portIndex", 0, minimum=0, path=where)
    if protocol != "COMMAND" and port is None and port_index >= max(port_count, 0):
        errors.add(
            f"{where}/portIndex",
            f"health check port index {port_index} must address one of the app's "
            f"{port_count} port definition(s)",
        )
    return HealthCheck(
        protocol=cast(HealthProtocol, protocol),
        path=path,
        port_index=port_index,
        port=port,
        command=command,
        grace_period_seconds=errors.integer(item, "gracePeriodSeconds", 300, minimum=0, path=where),
        interval_seconds=errors.integer(item, "intervalSeconds", 60, minimum=1, path=where),
        timeout_seconds=errors.integer(item, "timeoutSeconds", 20, minimum=1, path=where),
        max_consecutive_failures=errors.integer(
            item, "maxConsecutiveFailures", 3, minimum=0, path=where
        ),
        delay_seconds=errors.integer(item, "delaySeconds", 15, minimum=0, path=where),
        ignore_http1xx=errors.boolean(item, "ignoreHttp1xx", False, path=where),
    )


def _parse_container(
    doc: Mapping[str, Any], errors: _Errors
) -> tuple[dict[str, Any] | None, str | None]:
    raw = doc.get("container")
    if raw is None:
        return None, None
    if not isinstance(raw, dict):
        errors.add("/container", "expected an object")
        return None, None
    kind = raw.get("type", "DOCKER")
    if kind not in ("DOCKER", "MESOS"):
        errors.add("/container/type", "must be DOCKER or MESOS")
    docker = raw.get("docker")
    image: str | None = None
    if docker is not None:
        if not isinstance(docker, dict):
            errors.add("/container/docker", "expected an object")
        else:
            image = docker.get("image")
            if not isinstance(image, str) or not image.strip():
                errors.add("/container/docker/image", "a docker container needs an image")
                image = None
    elif kind == "DOCKER":
        errors.add("/container/docker", "a DOCKER container needs docker.image")
    container: dict[str, Any] = {"type": kind}
    if isinstance(docker, dict):
        container["docker"] = copy.deepcopy(docker)
    container["volumes"] = copy.deepcopy(raw.get("volumes") or [])
    if raw.get("portMappings"):
        container["portMappings"] = copy.deepcopy(raw["portMappings"])
    return container, image


def parse_app(doc: Any, *, app_id: str | None = None) -> AppDefinition:
    """Validate a Marathon app document (POST body or merged PUT) into a definition.

    ``app_id`` (from the request path) wins over the body's ``id``. The version is
    set to now; callers restoring persisted state use :func:`from_json` instead.
    """
    if not isinstance(doc, dict):
        raise ValidationFailed([{"path": "/", "errors": ["expected a JSON object"]}])
    errors = _Errors()
    for key in doc:
        if key not in KNOWN_FIELDS:
            errors.add(f"/{key}", "unknown property; not part of a Marathon app definition")

    raw_id = app_id if app_id is not None else doc.get("id")
    if not isinstance(raw_id, str) or not raw_id.strip("/ "):
        errors.add("/id", "is required: a path such as /myapp")
        norm_id = "/"
    else:
        norm_id = normalize_id(raw_id)
        for message in id_errors(norm_id):
            errors.add("/id", message)

    cmd = doc.get("cmd")
    if cmd is not None and (not isinstance(cmd, str) or not cmd.strip() or "\0" in cmd):
        errors.add("/cmd", "expected a non-empty string without NUL bytes")
        cmd = None
    args_raw = doc.get("args")
    args: tuple[str, ...] | None = None
    if args_raw is not None:
        if not isinstance(args_raw, list) or not all(
            isinstance(a, str) and "\0" not in a for a in args_raw
        ):
            errors.add("/args", "expected an array of strings without NUL bytes")
        elif args_raw:
            args = tuple(args_raw)
    container, image = _parse_container(doc, errors)
    if cmd is not None and args is not None:
        errors.add("/", "AppDefinition must contain one of 'cmd' or 'args', not both")
    elif cmd is None and args is None and container is None:
        errors.add(
            "/", "AppDefinition must either contain one of 'cmd' or 'args', and/or a 'container'"
        )

    env = errors.string_map(doc, "env")
    labels = errors.string_map(doc, "labels")
    _check_vhosts(labels, errors)
    instances = errors.integer(doc, "instances", 1, minimum=0, maximum=MAX_INSTANCES)
    cpus = errors.number(doc, "cpus", 1.0, minimum=0.001)
    mem = errors.number(doc, "mem", 128.0, minimum=0)
    disk = errors.number(doc, "disk", 0.0, minimum=0)
    ports = _parse_ports(doc, errors)
    require_ports = errors.boolean(doc, "requirePorts", False)
    if require_ports and any(p.port == 0 for p in ports):
        errors.add("/requirePorts", "requirePorts needs every port definition to name a port")

    checks: list[HealthCheck] = []
    raw_checks = doc.get("healthChecks") or []
    if not isinstance(raw_checks, list):
        errors.add("/healthChecks", "expected an array")
        raw_checks = []
    for i, item in enumerate(raw_checks):
        check = _parse_health_check(item, f"/healthChecks({i})", len(ports), errors)
        if check is not None:
            checks.append(check)

    strategy_raw = doc.get("upgradeStrategy") or {}
    if not isinstance(strategy_raw, dict):
        errors.add("/upgradeStrategy", "expected an object")
        strategy_raw = {}
    strategy = UpgradeStrategy(
        minimum_health_capacity=errors.number(
            strategy_raw,
            "minimumHealthCapacity",
            1.0,
            minimum=0,
            maximum=1,
            path="/upgradeStrategy",
        ),
        maximum_over_capacity=errors.number(
            strategy_raw,
            "maximumOverCapacity",
            1.0,
            minimum=0,
            maximum=1,
            path="/upgradeStrategy",
        ),
    )
    backoff_seconds = errors.number(doc, "backoffSeconds", 1.0, minimum=0)
    backoff_factor = errors.number(doc, "backoffFactor", 1.15, minimum=1.0)
    max_delay = errors.number(doc, "maxLaunchDelaySeconds", 3600.0, minimum=0)
    grace = errors.number(doc, "taskKillGracePeriodSeconds", DEFAULT_KILL_GRACE_SECONDS, minimum=0)
    if errors.details:
        raise ValidationFailed(errors.details)

    version = now_timestamp()
    app = AppDefinition(
        id=norm_id,
        cmd=cmd,
        args=args,
        env=env,
        instances=instances,
        cpus=cpus,
        mem=mem,
        disk=disk,
        port_definitions=ports,
        require_ports=require_ports,
        health_checks=tuple(checks),
        upgrade_strategy=strategy,
        backoff_seconds=backoff_seconds,
        backoff_factor=backoff_factor,
        max_launch_delay_seconds=max_delay,
        task_kill_grace_period_seconds=grace,
        labels=labels,
        container_image=image,
        version=version,
        version_info=VersionInfo(version, version),
    )
    passthrough = {k: copy.deepcopy(doc[k]) for k in PASSTHROUGH_FIELDS if k in doc}
    return replace(app, raw=_normalised(app, container, passthrough))


def _health_check_json(check: HealthCheck) -> dict[str, Any]:
    out: dict[str, Any] = {"protocol": check.protocol}
    if check.protocol == "COMMAND":
        out["command"] = {"value": check.command}
    else:
        if check.protocol in ("HTTP", "HTTPS", "MESOS_HTTP", "MESOS_HTTPS"):
            out["path"] = check.path
        if check.port is not None:
            out["port"] = check.port
        else:
            out["portIndex"] = check.port_index
    out.update(
        gracePeriodSeconds=check.grace_period_seconds,
        intervalSeconds=check.interval_seconds,
        timeoutSeconds=check.timeout_seconds,
        maxConsecutiveFailures=check.max_consecutive_failures,
        delaySeconds=check.delay_seconds,
    )
    if check.protocol in ("HTTP", "HTTPS", "MESOS_HTTP", "MESOS_HTTPS"):
        out["ignoreHttp1xx"] = check.ignore_http1xx
    return out


def _normalised(
    app: AppDefinition, container: Mapping[str, Any] | None, passthrough: Mapping[str, Any]
) -> dict[str, Any]:
    """The app as Marathon would render it: every default filled in, stable key order."""
    doc: dict[str, Any] = {"id": app.id}
    if app.cmd is not None:
        doc["cmd"] = app.cmd
    if app.args is not None:
        doc["args"] = list(app.args)
    doc.update(
        env=dict(app.env),
        instances=app.instances,
        cpus=app.cpus,
        mem=app.mem,
        disk=app.disk,
        gpus=0,
        constraints=[],
        uris=[],
        fetch=[],
        storeUrls=[],
        backoffSeconds=app.backoff_seconds,
        backoffFactor=app.backoff_factor,
        maxLaunchDelaySeconds=app.max_launch_delay_seconds,
    )
    if container is not None:
        doc["container"] = dict(container)
    doc.update(
        healthChecks=[_health_check_json(h) for h in app.health_checks],
        readinessChecks=[],
        dependencies=[],
        upgradeStrategy={
            "minimumHealthCapacity": app.upgrade_strategy.minimum_health_capacity,
            "maximumOverCapacity": app.upgrade_strategy.maximum_over_capacity,
        },
        labels=dict(app.labels),
        taskKillGracePeriodSeconds=app.task_kill_grace_period_seconds,
        killSelection="YOUNGEST_FIRST",
        requirePorts=app.require_ports,
        portDefinitions=[_port_json(p) for p in app.port_definitions],
    )
    doc.update(passthrough)
    doc["version"] = app.version
    doc["versionInfo"] = {
        "lastScalingAt": app.version_info.last_scaling_at,
        "lastConfigChangeAt": app.version_info.last_config_change_at,
    }
    return doc


def _port_json(port: PortDefinition) -> dict[str, Any]:
    out: dict[str, Any] = {"port": port.port, "protocol": port.protocol}
    if port.name is not None:
        out["name"] = port.name
    out["labels"] = dict(port.labels)
    return out


def _with_version(app: AppDefinition, version: str, info: VersionInfo) -> AppDefinition:
    raw = dict(app.raw)
    raw["version"] = version
    raw["versionInfo"] = {
        "lastScalingAt": info.last_scaling_at,
        "lastConfigChangeAt": info.last_config_change_at,
    }
    return replace(app, version=version, version_info=info, raw=raw)


def _definition_body(app: AppDefinition) -> dict[str, Any]:
    return {k: v for k, v in app.raw.items() if k not in READ_ONLY_FIELDS}


def merge_app(
    current: AppDefinition, patch: Mapping[str, Any], *, partial: bool = True
) -> AppDefinition:
    """A PUT body merged over ``current`` (top-level keys replace), newly versioned.

    ``partial=False`` replaces the definition instead (Marathon's
    ``partialUpdate=false``). A change of ``instances`` alone is a scaling:
    ``lastConfigChangeAt`` stays, as in Marathon, so tasks keep their config version.
    """
    if not isinstance(patch, Mapping):
        raise ValidationFailed([{"path": "/", "errors": ["expected a JSON object"]}])
    body = _definition_body(current) if partial else {}
    # The `ports` shorthand would otherwise fight the stored portDefinitions.
    if "ports" in patch and "portDefinitions" not in patch:
        body.pop("portDefinitions", None)
    # Switching between cmd and args replaces the other, rather than a 422.
    if patch.get("cmd") is not None:
        body.pop("args", None)
    if patch.get("args"):
        body.pop("cmd", None)
    for key, value in patch.items():
        if key in READ_ONLY_FIELDS or key == "id":
            continue
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    merged = parse_app(body, app_id=current.id)
    version = next_version(current.version)
    before = _definition_body(current)
    after = _definition_body(merged)
    before.pop("instances", None)
    after.pop("instances", None)
    scaling_only = before == after
    info = VersionInfo(
        last_scaling_at=version,
        last_config_change_at=(
            current.version_info.last_config_change_at if scaling_only else version
        ),
    )
    return _with_version(merged, version, info)


def with_instances(app: AppDefinition, instances: int) -> AppDefinition:
    """``app`` scaled to ``instances`` (kill with scale=true), as a new scaling version."""
    if instances < 0:
        raise ValueError("instances must be 0 or more")
    raw = dict(app.raw)
    raw["instances"] = instances
    version = next_version(app.version)
    info = VersionInfo(version, app.version_info.last_config_change_at)
    return _with_version(replace(app, instances=instances, raw=raw), version, info)


def to_json(app: AppDefinition) -> dict[str, Any]:
    """The persisted form: Marathon's JSON of the app, version included."""
    return copy.deepcopy(dict(app.raw))


def from_json(doc: Mapping[str, Any]) -> AppDefinition:
    """Inverse of :func:`to_json`; keeps the stored version instead of minting one."""
    app = parse_app(dict(doc))
    version = doc.get("version") or app.version
    info_raw = doc.get("versionInfo") or {}
    info = VersionInfo(
        last_scaling_at=info_raw.get("lastScalingAt") or version,
        last_config_change_at=info_raw.get("lastConfigChangeAt") or version,
    )
    return _with_version(app, version, info)
