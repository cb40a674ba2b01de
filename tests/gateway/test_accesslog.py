"""The access log: one JSON line per request, written off the request path, rotated by size."""

from __future__ import annotations

import json

import httpx

from berth.gateway.accesslog import AccessLog, IsoClock, LogContext, json_bytes, json_text
from berth.gateway.metrics import Metrics
from berth.gateway.routes import Route
from tests.gateway.conftest import raw_request

FIELDS = {
    "time", "request_id", "client_ip", "host", "route", "cluster", "method", "path", "status",
    "upstream_addr", "upstream_status", "tries", "request_bytes", "response_bytes",
    "request_time", "upstream_time", "user_agent",
}  # fmt: skip


def line(record: dict[str, object]) -> bytes:
    """A record as the writer takes it: one JSON line (the proxy formats its own)."""
    return (json.dumps(record, separators=(",", ":")) + "\n").encode()


async def test_one_json_line_per_request(make_gateway, upstreams, tmp_path) -> None:
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set([Route("img.example.com", "/", "c")], {"c": [("127.0.0.1", a.port)]})
    async with httpx.AsyncClient(base_url=gw.url) as client:
        r = await client.put(
            "/p?x=1",
            content=b"12345",
            headers={"Host": "img.example.com", "User-Agent": "t/1", "X-Request-Id": "rid-1"},
        )
        assert r.status_code == 200
        first_size = len(r.content)
        r = await client.get("/", headers={"Host": "unknown.test"})
        assert r.status_code == 404
    assert gw.server.access_log is not None
    await gw.server.access_log.flush()
    lines = (tmp_path / "logs" / "gateway" / "access.log").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == FIELDS
    assert first["request_id"] == "rid-1"
    assert first["client_ip"] == "127.0.0.1"
    assert first["host"] == "img.example.com"
    assert first["route"] == "img.example.com" and first["cluster"] == "c"
    assert first["method"] == "PUT" and first["path"] == "/p?x=1"
    assert first["status"] == 200 and first["upstream_status"] == 200
    assert first["upstream_addr"] == f"127.0.0.1:{a.port}" and first["tries"] == 1
    assert first["request_bytes"] == 5 and first["response_bytes"] == first_size
    assert first["request_time"] >= first["upstream_time"] >= 0
    assert first["user_agent"] == "t/1"
    assert first["time"].endswith("Z")
    assert second["status"] == 404 and second["route"] == "-" and second["tries"] == 0


async def test_hostile_values_still_make_valid_json(make_gateway, upstreams, tmp_path) -> None:
    """Path, Host, User-Agent and request id come from the client: quotes,
    backslashes, control-looking escapes and non-UTF-8 bytes must not break the line."""
    a = await upstreams("a")
    gw = await make_gateway()
    gw.routes.set([Route("h.test", "/", "c")], {"c": [("127.0.0.1", a.port)]})
    ua = b'x"y\\z \xe9\xff {"status": 1}'
    reply = await raw_request(
        gw.port,
        b'GET /a"b\\c?q="1" HTTP/1.1\r\nHost: h.test\r\nUser-Agent: '
        + ua
        + b'\r\nX-Request-Id: id"\\1\r\nConnection: close\r\n\r\n',
    )
    # (The test upstream itself chokes on the non-UTF-8 header: any status will do.)
    status = int(reply.split(b" ", 2)[1])
    assert gw.server.access_log is not None
    await gw.server.access_log.flush()
    (text,) = (tmp_path / "logs" / "gateway" / "access.log").read_text("utf-8").splitlines()
    record = json.loads(text)
    assert record["path"] == '/a"b\\c?q="1"'
    assert record["request_id"] == 'id"\\1'
    assert record["user_agent"] == ua.decode("latin-1")
    assert record["status"] == record["upstream_status"] == status


async def test_rotation_by_size_and_no_loss(tmp_path) -> None:
    path = tmp_path / "access.log"
    metrics = Metrics()
    log = AccessLog(path, max_bytes=2000, backups=3, max_pending=10_000, metrics=metrics)
    await log.start()
    for i in range(200):
        log.write(line({"n": i, "pad": "x" * 50}))
    await log.stop()
    files = [path, *(path.with_name(f"access.log.{n}") for n in (1, 2, 3))]
    assert all(f.exists() for f in files)
    assert not path.with_name("access.log.4").exists()
    assert all(f.stat().st_size <= 2000 for f in files)
    kept = [json.loads(line)["n"] for f in reversed(files) for line in f.read_text().splitlines()]
    # The newest records are all there, in order; older ones rotated out whole.
    assert kept == list(range(200 - len(kept), 200))
    assert metrics.access_log_written == 200 and metrics.access_log_dropped == 0


async def test_full_buffer_drops_are_counted(tmp_path) -> None:
    metrics = Metrics()
    log = AccessLog(
        tmp_path / "access.log", max_bytes=1 << 20, backups=1, max_pending=10, metrics=metrics
    )
    # Not started: nothing drains the buffer, so the 11th record on is dropped.
    for i in range(15):
        log.write(line({"n": i}))
    assert metrics.access_log_dropped == 5
    assert "access_log_dropped_total 5" in metrics.render()
    await log.flush()
    assert len((tmp_path / "access.log").read_text().splitlines()) == 10


def test_iso_clock_formats_each_millisecond() -> None:
    clock = IsoClock()
    assert clock(0.0) == b"1970-01-01T00:00:00.000Z"
    assert clock(0.0004) == b"1970-01-01T00:00:00.000Z"
    assert clock(1.9996) == b"1970-01-01T00:00:01.999Z"
    assert clock(86400 + 3723.25) == b"1970-01-02T01:02:03.250Z"
    assert clock(1.5) == b"1970-01-01T00:00:01.500Z"  # backwards too


def test_json_bytes_passes_plain_ascii_through_and_escapes_the_rest() -> None:
    plain = b"/img/cat.jpg?w=300&fmt=webp"
    assert json_bytes(plain) is plain
    for raw in (
        b'say "hi"',
        b"back\\slash",
        b"tab\there",
        b"\x00\x1f\x7f",
        b"caf\xe9",
        b"\xff\xfe",
    ):
        out = json_bytes(raw)
        assert json.loads(b'"' + out + b'"') == raw.decode("latin-1")


def test_json_text_quotes_and_reuses() -> None:
    assert json_text("img.example.com") == b'"img.example.com"'
    assert json_text('odd"name') == b'"odd\\"name"'
    assert json_text("img.example.com") is json_text("img.example.com")


def test_log_context_is_remade_when_a_field_changes() -> None:
    context = LogContext("10.0.0.1")
    route, cluster, addr = "img", "imgprocess", "127.0.0.1:8000"
    first = context(b"h.test", b"curl/8", b"GET", route, cluster, addr)
    assert context(b"h.test", b"curl/8", b"GET", route, cluster, addr) is first
    doc = json.loads(b"{" + first + b"}")
    assert doc == {
        "client_ip": "10.0.0.1", "host": "h.test", "method": "GET", "route": "img",
        "cluster": "imgprocess", "upstream_addr": "127.0.0.1:8000", "user_agent": "curl/8",
    }  # fmt: skip
    changed = [
        (b'a"b', b"curl/8", b"GET", route, cluster, addr),
        (b"h.test", b"x\\y", b"GET", route, cluster, addr),
        (b"h.test", b"curl/8", b"PUT", route, cluster, addr),
        (b"h.test", b"curl/8", b"GET", "", "", ""),
    ]
    for fields in changed:
        doc = json.loads(b"{" + context(*fields) + b"}")
        assert doc["host"] == fields[0].decode() and doc["user_agent"] == fields[1].decode()
        assert doc["method"] == fields[2].decode() and doc["route"] == (fields[3] or "-")
        assert doc["upstream_addr"] == (fields[5] or "-")
