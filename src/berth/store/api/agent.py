"""/v1/agent, /v1/health, /v1/catalog and /v1/status: service discovery on one node."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.types import Send

from berth.store.api.http import Request, check_consistency, require_method, respond
from berth.store.checks import MAX_OUTPUT
from berth.store.definitions import fold, parse_check, parse_service
from berth.store.errors import BadRequest, InvalidState, NotFound
from berth.store.model import STATUSES, Check, Service, Status

if TYPE_CHECKING:
    from berth.store.server import StoreServer

SERF_OUTPUT = "Agent alive and reachable"
TTL_VERBS: dict[str, Status] = {"pass": "passing", "warn": "warning", "fail": "critical"}


def node_doc(store: StoreServer) -> dict[str, Any]:
    cfg = store.config
    return {
        "ID": store.node_id,
        "Node": cfg.node_name,
        "Address": cfg.advertise_address,
        "Datacenter": cfg.datacenter,
        "TaggedAddresses": {"lan": cfg.advertise_address, "wan": cfg.advertise_address},
        "Meta": {},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    }


def serf_check(store: StoreServer) -> dict[str, Any]:
    return {
        "Node": store.config.node_name,
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": SERF_OUTPUT,
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Definition": {},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    }


def _has_tags(service: Service, tags: list[str]) -> bool:
    return all(t in service.tags for t in tags)


def health_entries(
    store: StoreServer, name: str, passing: bool, tags: list[str]
) -> tuple[int, list[dict[str, Any]]]:
    state = store.state
    node = node_doc(store)
    serf = serf_check(store)
    node_checks = state.node_checks()
    entries = []
    for service in state.instances(name):
        if not _has_tags(service, tags):
            continue
        checks = node_checks + sorted(state.service_checks(service.id), key=lambda c: c.id)
        if passing and any(c.status != "passing" for c in checks):
            continue
        entries.append(
            {
                "Node": node,
                "Service": service.health_doc(),
                "Checks": [serf, *(c.doc(store.config.node_name) for c in checks)],
            }
        )
    return state.table_index("svc:" + name), entries


def catalog_entries(store: StoreServer, name: str, tags: list[str]) -> list[dict[str, Any]]:
    cfg = store.config
    out = []
    for s in store.state.instances(name):
        if not _has_tags(s, tags):
            continue
        out.append(
            {
                "ID": store.node_id,
                "Node": cfg.node_name,
                "Address": cfg.advertise_address,
                "Datacenter": cfg.datacenter,
                "TaggedAddresses": {"lan": cfg.advertise_address, "wan": cfg.advertise_address},
                "NodeMeta": {},
                "ServiceID": s.id,
                "ServiceName": s.name,
                "ServiceTags": list(s.tags),
                "ServiceAddress": s.address,
                "ServiceTaggedAddresses": s.tagged_addresses,
                "ServicePort": s.port,
                "ServiceMeta": s.meta,
                "ServiceWeights": s.weights,
                "ServiceEnableTagOverride": s.enable_tag_override,
                "CreateIndex": s.create_index,
                "ModifyIndex": s.modify_index,
            }
        )
    return out


def catalog_services(store: StoreServer) -> tuple[int, dict[str, list[str]]]:
    services: dict[str, set[str]] = {"consul": set()}
    for s in store.state.services.values():
        services.setdefault(s.name, set()).update(s.tags)
    return store.state.table_index("catalog"), {k: sorted(v) for k, v in sorted(services.items())}


def _no_filter(req: Request) -> None:
    if req.param("filter"):
        raise BadRequest("filter expressions are not supported by berth's store")


async def handle_health(store: StoreServer, req: Request, send_: Send) -> None:
    require_method(req, "GET")
    check_consistency(req)
    _no_filter(req)
    rest = req.path[len("/v1/health/") :]
    kind, _, name = rest.partition("/")
    if kind == "service" and name:
        passing = req.flag("passing")
        tags = req.query.get("tag", [])
        index, entries = await store.block(
            req, lambda: health_entries(store, name, passing, tags), topic="svc:" + name
        )
        await respond(send_, 200, store.dumps(entries), index=index)
    elif kind == "checks" and name:
        state = store.state

        def checks() -> tuple[int, list[dict[str, Any]]]:
            found = [
                c.doc(store.config.node_name)
                for s in state.instances(name)
                for c in state.service_checks(s.id)
            ]
            return state.table_index("svc:" + name), found

        index, found = await store.block(req, checks, topic="svc:" + name)
        await respond(send_, 200, store.dumps(found), index=index)
    elif kind == "state" and name:
        if name not in (*STATUSES, "any"):
            raise BadRequest(f"Bad check state {name!r}")
        state = store.state

        def by_state() -> tuple[int, list[dict[str, Any]]]:
            docs = [serf_check(store)] if name in ("passing", "any") else []
            docs += [
                c.doc(store.config.node_name)
                for c in sorted(state.checks.values(), key=lambda c: c.id)
                if name == "any" or c.status == name
            ]
            return state.table_index("checks"), docs

        index, docs = await store.block(req, by_state, topic="checks")
        await respond(send_, 200, store.dumps(docs), index=index)
    elif kind == "node" and name:
        index = store.state.table_index("checks")
        body = [serf_check(store)] if name == store.config.node_name else []
        await respond(send_, 200, store.dumps(body), index=index)
    else:
        raise NotFound(f"unknown health endpoint {req.path}")


async def handle_catalog(store: StoreServer, req: Request, send_: Send) -> None:
    require_method(req, "GET")
    check_consistency(req)
    _no_filter(req)
    rest = req.path[len("/v1/catalog/") :]
    kind, _, name = rest.partition("/")
    if kind == "services" and not name:
        index, services = await store.block(req, lambda: catalog_services(store), topic="catalog")
        await respond(send_, 200, store.dumps(services), index=index)
    elif kind == "service" and name:
        tags = req.query.get("tag", [])
        state = store.state
        index, entries = await store.block(
            req,
            lambda: (state.table_index("svc:" + name), catalog_entries(store, name, tags)),
            topic="svc:" + name,
        )
        await respond(send_, 200, store.dumps(entries), index=index)
    elif kind == "nodes" and not name:
        node = node_doc(store)
        await respond(send_, 200, store.dumps([node]), index=1)
    elif kind == "datacenters" and not name:
        await respond(send_, 200, store.dumps([store.config.datacenter]))
    elif kind == "node" and name:
        cfg = store.config
        if name != cfg.node_name:
            await respond(send_, 200, b"null", index=1)
            return
        by_id = {s.id: s.agent_doc(cfg.datacenter) for s in store.state.services.values()}
        doc: dict[str, Any] = {"Node": node_doc(store), "Services": by_id}
        await respond(send_, 200, store.dumps(doc), index=store.state.table_index("catalog"))
    else:
        raise NotFound(f"unknown catalog endpoint {req.path}")


async def handle_agent(store: StoreServer, req: Request, send_: Send) -> None:
    rest = req.path[len("/v1/agent/") :]
    state = store.state
    cfg = store.config
    if rest == "services":
        require_method(req, "GET")
        _no_filter(req)
        doc = {
            s.id: s.agent_doc(cfg.datacenter)
            for s in sorted(state.services.values(), key=lambda s: s.id)
        }
        await respond(send_, 200, store.dumps(doc))
    elif rest == "checks":
        require_method(req, "GET")
        _no_filter(req)
        docs = {
            c.id: c.doc(cfg.node_name) for c in sorted(state.checks.values(), key=lambda c: c.id)
        }
        await respond(send_, 200, store.dumps(docs))
    elif rest == "service/register":
        require_method(req, "PUT")
        body = await req.json(cfg.limit_body_bytes)
        if body is None:
            raise BadRequest("Request decode failed: empty body")
        service, checks = parse_service(body, deregister_min_s=cfg.deregister_min_s)
        replace_checks = req.flag("replace-existing-checks")
        now = store.now()
        await store.write(lambda tx: tx.register_service(service, checks, replace_checks, now))
        await respond(send_, 200, b"")
    elif rest.startswith("service/deregister/"):
        require_method(req, "PUT")
        sid = rest[len("service/deregister/") :]
        now = store.now()
        await store.write(lambda tx: tx.deregister_service(sid, now))
        await respond(send_, 200, b"")
    elif rest.startswith("service/"):
        require_method(req, "GET")
        found = state.services.get(rest[len("service/") :])
        if found is None:
            raise NotFound(f"unknown service ID: {rest[len('service/') :]}")
        await respond(send_, 200, store.dumps(found.agent_doc(cfg.datacenter)))
    elif rest.startswith("check/"):
        await _check_endpoint(store, req, rest[len("check/") :], send_)
    elif rest == "self":
        require_method(req, "GET")
        doc = {
            "Config": {
                "Datacenter": cfg.datacenter,
                "NodeName": cfg.node_name,
                "NodeID": store.node_id,
                "Server": True,
                "Version": "1.20.0-berth",
            },
            "Member": {
                "Name": cfg.node_name,
                "Addr": cfg.advertise_address,
                "Port": 8301,
                "Status": 1,
            },
            "Meta": {},
        }
        await respond(send_, 200, store.dumps(doc))
    else:
        raise NotFound(f"unknown agent endpoint {req.path}")


def _parse_check_registration(store: StoreServer, body: Any) -> Check:
    """PUT /v1/agent/check/register: a check of a registered service (ServiceID) or
    of the node itself (then part of every service's health)."""
    doc = fold(body, "check definition")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("Missing check name")
    service_id = doc.get("serviceid") or ""
    if not isinstance(service_id, str):
        raise BadRequest("ServiceID must be a string")
    if service_id:
        service = store.state.services.get(service_id)
        if service is None:
            raise InvalidState(f'ServiceID "{service_id}" does not exist')
    else:
        service = Service("", "", (), "", 0, {}, {}, {}, False, 0, 0)
    return parse_check(body, service, name, deregister_min_s=store.config.deregister_min_s)


async def _check_endpoint(store: StoreServer, req: Request, rest: str, send_: Send) -> None:
    verb, _, check_id = rest.partition("/")
    require_method(req, "PUT")
    now = store.now()
    if verb == "deregister" and check_id:
        await store.write(lambda tx: tx.deregister_check(check_id, now))
        await respond(send_, 200, b"")
        return
    if verb == "register" and not check_id:
        new = _parse_check_registration(store, await req.json(store.config.limit_body_bytes))
        await store.write(lambda tx: tx.register_check(new, now))
        await respond(send_, 200, b"")
        return
    if verb in TTL_VERBS and check_id:
        status = TTL_VERBS[verb]
        output = req.param("note")
    elif verb == "update" and check_id:
        doc = await req.json(store.config.limit_body_bytes)
        if not isinstance(doc, dict):
            raise BadRequest('Request decode failed: expected {"Status", "Output"}')
        folded = {str(k).lower(): v for k, v in doc.items()}
        given = folded.get("status")
        output = folded.get("output") or ""
        if given not in STATUSES:
            raise BadRequest(f"Invalid check status: {given!r}")
        status = next(x for x in STATUSES if x == given)
        if not isinstance(output, str):
            raise BadRequest("Output must be a string")
    else:
        raise NotFound(f"unknown agent check endpoint {req.path}")
    check = store.state.checks.get(check_id)
    if check is None or check.spec.kind != "ttl":
        raise InvalidState(f'CheckID "{check_id}" does not have associated TTL')
    output = output[:MAX_OUTPUT]
    store.checks.ttl_reset(check_id)
    await store.write(lambda tx: tx.update_check(check_id, status, output, now))
    await respond(send_, 200, b"")


async def handle_status(store: StoreServer, req: Request, send_: Send) -> None:
    require_method(req, "GET")
    addr = f"{store.config.advertise_address}:8300"
    if req.path == "/v1/status/leader":
        await respond(send_, 200, store.dumps(addr))
    elif req.path == "/v1/status/peers":
        await respond(send_, 200, store.dumps([addr]))
    else:
        raise NotFound(f"unknown status endpoint {req.path}")
