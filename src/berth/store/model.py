"""The records the store holds, and their Consul JSON shapes.

Records are replaced, never mutated, once they are in the state: a write makes
a new record. That lets a KV entry cache its JSON encoding for the read path.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Status = Literal["passing", "warning", "critical"]
Behavior = Literal["release", "delete"]
STATUSES: tuple[Status, ...] = ("passing", "warning", "critical")


@dataclass(slots=True, eq=False)
class Entry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int = 0
    session: str | None = None
    _encoded: bytes | None = field(default=None, repr=False)

    def doc(self, *, with_value: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "LockIndex": self.lock_index,
            "Key": self.key,
            "Flags": self.flags,
            "Value": (
                base64.b64encode(self.value).decode()
                if with_value and self.value is not None
                else None
            ),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }
        if self.session:
            doc["Session"] = self.session
        return doc

    def encoded(self) -> bytes:
        """This entry's JSON object, encoded once (entries are never mutated)."""
        if self._encoded is None:
            self._encoded = orjson.dumps(self.doc())
        return self._encoded


@dataclass(slots=True, frozen=True)
class Session:
    id: str
    name: str
    node: str
    lock_delay_ns: int
    behavior: Behavior
    ttl: str  # "" when the session has no TTL, else Consul's "<n>s"
    node_checks: tuple[str, ...]
    service_checks: tuple[str, ...]
    create_index: int
    modify_index: int

    def doc(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Node": self.node,
            "LockDelay": self.lock_delay_ns,
            "Behavior": self.behavior,
            "TTL": self.ttl,
            "NodeChecks": list(self.node_checks),
            "ServiceChecks": [{"ID": c, "Namespace": ""} for c in self.service_checks] or None,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Session:
        return cls(
            id=doc["ID"],
            name=doc["Name"],
            node=doc["Node"],
            lock_delay_ns=doc["LockDelay"],
            behavior=doc["Behavior"],
            ttl=doc["TTL"],
            node_checks=tuple(doc["NodeChecks"]),
            service_checks=tuple(c["ID"] for c in doc["ServiceChecks"] or ()),
            create_index=doc["CreateIndex"],
            modify_index=doc["ModifyIndex"],
        )


@dataclass(slots=True, frozen=True)
class Service:
    id: str
    name: str
    tags: tuple[str, ...]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    tagged_addresses: dict[str, Any]
    enable_tag_override: bool
    create_index: int
    modify_index: int

    def agent_doc(self, datacenter: str) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Meta": self.meta,
            "Port": self.port,
            "Address": self.address,
            "TaggedAddresses": self.tagged_addresses,
            "Weights": self.weights,
            "EnableTagOverride": self.enable_tag_override,
            "Datacenter": datacenter,
        }

    def health_doc(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags),
            "Address": self.address,
            "TaggedAddresses": self.tagged_addresses,
            "Meta": self.meta,
            "Port": self.port,
            "Weights": self.weights,
            "EnableTagOverride": self.enable_tag_override,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def to_doc(self) -> dict[str, Any]:
        return self.health_doc()

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Service:
        return cls(
            id=doc["ID"],
            name=doc["Service"],
            tags=tuple(doc["Tags"]),
            address=doc["Address"],
            port=doc["Port"],
            meta=doc["Meta"],
            weights=doc["Weights"],
            tagged_addresses=doc["TaggedAddresses"],
            enable_tag_override=doc["EnableTagOverride"],
            create_index=doc["CreateIndex"],
            modify_index=doc["ModifyIndex"],
        )


@dataclass(slots=True, frozen=True)
class CheckSpec:
    """How a check is run: exactly one of http, tcp or ttl is set (or none: a
    check only updated through the API, like Consul's script-less checks)."""

    http: str = ""
    method: str = "GET"
    header: dict[str, list[str]] = field(default_factory=dict)
    body: str = ""
    tcp: str = ""
    ttl_s: float = 0.0
    interval_s: float = 0.0
    timeout_s: float = 10.0
    deregister_after_s: float = 0.0
    tls_skip_verify: bool = False

    @property
    def kind(self) -> str:
        return "http" if self.http else "tcp" if self.tcp else "ttl" if self.ttl_s else ""

    def to_doc(self) -> dict[str, Any]:
        return {
            "HTTP": self.http,
            "Method": self.method,
            "Header": self.header,
            "Body": self.body,
            "TCP": self.tcp,
            "TTL": self.ttl_s,
            "Interval": self.interval_s,
            "Timeout": self.timeout_s,
            "DeregisterCriticalServiceAfter": self.deregister_after_s,
            "TLSSkipVerify": self.tls_skip_verify,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> CheckSpec:
        return cls(
            http=doc["HTTP"],
            method=doc["Method"],
            header=doc["Header"],
            body=doc["Body"],
            tcp=doc["TCP"],
            ttl_s=doc["TTL"],
            interval_s=doc["Interval"],
            timeout_s=doc["Timeout"],
            deregister_after_s=doc["DeregisterCriticalServiceAfter"],
            tls_skip_verify=doc["TLSSkipVerify"],
        )


@dataclass(slots=True, frozen=True)
class Check:
    id: str
    name: str
    status: Status
    notes: str
    output: str
    service_id: str
    service_name: str
    service_tags: tuple[str, ...]
    spec: CheckSpec
    create_index: int
    modify_index: int

    def doc(self, node: str) -> dict[str, Any]:
        return {
            "Node": node,
            "CheckID": self.id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.spec.kind,
            "Interval": _go_duration(self.spec.interval_s),
            "Timeout": _go_duration(self.spec.timeout_s)
            if self.spec.kind in ("http", "tcp")
            else "",
            "ExposedPort": 0,
            "Definition": {},
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def to_doc(self) -> dict[str, Any]:
        return {**self.doc(""), "Spec": self.spec.to_doc()}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Check:
        return cls(
            id=doc["CheckID"],
            name=doc["Name"],
            status=doc["Status"],
            notes=doc["Notes"],
            output=doc["Output"],
            service_id=doc["ServiceID"],
            service_name=doc["ServiceName"],
            service_tags=tuple(doc["ServiceTags"]),
            spec=CheckSpec.from_doc(doc["Spec"]),
            create_index=doc["CreateIndex"],
            modify_index=doc["ModifyIndex"],
        )


def _go_duration(seconds: float) -> str:
    if not seconds:
        return ""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds * 1000:g}ms"
