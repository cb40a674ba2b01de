"""Pure pieces of the data path: header rewriting, retry decisions, metrics text."""

from __future__ import annotations

from berth.gateway.config import GatewayConfig
from berth.gateway.exchange import should_retry
from berth.gateway.headers import (
    HOP_BY_HOP,
    chunk,
    client_response_head,
    may_be,
    name_lengths,
    upstream_request_head,
)
from berth.gateway.metrics import LATENCY_BUCKETS, Metrics, RouteMetrics
from berth.gateway.proxy import ProxyContext
from berth.gateway.routes import RoutingTable
from berth.gateway.upstream import UpstreamPool


def test_upstream_request_head_rewrites_hop_by_hop_and_forwarding() -> None:
    head = upstream_request_head(
        b"POST",
        b"/a?b=1",
        [
            (b"Host", b"svc:3130"),
            (b"Connection", b"keep-alive, X-Drop"),
            (b"X-Drop", b"1"),
            (b"Keep-Alive", b"5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Expect", b"100-continue"),
            (b"X-Forwarded-For", b"1.2.3.4"),
            (b"Accept", b"*/*"),
        ],
        host=b"svc:3130",
        client_ip="10.0.0.9",
        request_id=b"rid",
        body="chunked",
        upgrade=None,
    )
    assert head == (
        b"POST /a?b=1 HTTP/1.1\r\nHost: svc:3130\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 1.2.3.4, 10.0.0.9\r\nX-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: svc:3130\r\nX-Request-Id: rid\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    head = upstream_request_head(
        b"GET", b"/ws", [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")],
        host=b"h", client_ip="::1", request_id=b"r", body="none", upgrade=b"websocket",
    )  # fmt: skip
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in head
    assert b"Content-Length" not in head
    head = upstream_request_head(
        b"PUT", b"/", [], host=b"h", client_ip="1.1.1.1", request_id=b"r", body="42", upgrade=None
    )
    assert head.endswith(b"Content-Length: 42\r\n\r\n")


def test_client_response_head_framing() -> None:
    headers = [(b"Content-Type", b"text/plain"), (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1")]
    head = client_response_head(
        200, b"OK", headers, framing="chunked", keep_alive=True, request_id=b"r1"
    )
    assert head == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Request-Id: r1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    head = client_response_head(
        200, b"", [(b"X-Request-Id", b"up")], framing="close", keep_alive=True, request_id=b"r"
    )
    assert head == b"HTTP/1.1 200 -\r\nX-Request-Id: up\r\nConnection: close\r\n\r\n"
    head = client_response_head(
        101, b"Switching Protocols", [(b"Upgrade", b"websocket")],
        framing="none", keep_alive=True, request_id=b"r", upgrade=b"websocket",
    )  # fmt: skip
    assert head.endswith(b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert chunk(b"hello") == b"5\r\nhello\r\n"


def test_retry_decisions_follow_proxy_next_upstream() -> None:
    kw = {"replayable": True, "response_started": False}
    assert should_retry(error=True, status=0, method=b"POST", **kw)
    # Sent, then failed (read timeout, reset): the server may have acted on it.
    assert not should_retry(error=True, status=0, method=b"POST", request_sent=True, **kw)
    assert should_retry(error=True, status=0, method=b"GET", request_sent=True, **kw)
    assert should_retry(error=False, status=502, method=b"GET", **kw)
    assert should_retry(error=False, status=504, method=b"PUT", **kw)
    assert not should_retry(error=False, status=503, method=b"POST", **kw)
    assert not should_retry(error=False, status=500, method=b"GET", **kw)
    assert not should_retry(error=True, status=0, method=b"GET", replayable=False,
                            response_started=False)  # fmt: skip
    assert not should_retry(error=True, status=0, method=b"GET", replayable=True,
                            response_started=True)  # fmt: skip


def test_metrics_render_prometheus_text() -> None:
    m = Metrics()
    m.observe_request('a"b', 200, 0.003, 10, 20)
    m.observe_request('a"b', 200, 2.0, 0, 5)
    m.observe_try("c", "ok")
    m.connections_active = 3
    text = m.render()
    assert 'berth_gateway_requests_total{route="a\\"b",status="200"} 2' in text
    assert 'berth_gateway_request_seconds_bucket{route="a\\"b",le="0.005"} 1' in text
    assert 'berth_gateway_request_seconds_bucket{route="a\\"b",le="+Inf"} 2' in text
    assert 'berth_gateway_request_seconds_count{route="a\\"b"} 2' in text
    assert 'berth_gateway_upstream_tries_total{cluster="c",outcome="ok"} 1' in text
    assert "berth_gateway_connections_active 3" in text
    assert "berth_gateway_received_bytes_total 10" in text
    assert "berth_gateway_sent_bytes_total 25" in text
    assert repr(m) == "<Metrics requests=2 connections_active=3>"


def test_latency_buckets_count_values_up_to_their_bound() -> None:
    """Prometheus' ``le``: a value equal to a bound is in that bucket."""
    m = RouteMetrics()
    for seconds in (0.0, 0.001, 0.0011, 10.0, 10.5, 99.0):
        m.observe(200, seconds)
    m.observe(502, 0.001)
    assert m.counts[0] == 3  # 0, 0.001 and the 502's 0.001
    assert m.counts[1] == 1  # 0.0011 <= 0.0025
    assert m.counts[LATENCY_BUCKETS.index(10.0)] == 1
    assert m.counts[-1] == 2  # +Inf
    assert m.statuses == {200: 6, 502: 1}
    assert sum(m.counts) == 7


async def test_request_ids_count_up_across_suffix_blocks() -> None:
    ctx = ProxyContext(config=GatewayConfig(), routes=FixedTable(), pool=UpstreamPool(
        max_idle=1, idle_timeout=1.0))  # fmt: skip
    ids = [ctx.next_request_id() for _ in range(4100)]
    prefix = ids[0][:12]
    assert [int(i[12:], 16) for i in ids] == list(range(1, 4101))
    assert all(len(i) == 24 and i[:12] == prefix for i in ids)


class FixedTable:
    @property
    def table(self) -> RoutingTable:
        return RoutingTable()


def test_name_lengths_marks_each_length() -> None:
    mask = name_lengths((b"te", b"connection", b"keep-alive"))
    assert [n for n in range(64) if (mask >> n) & 1] == [2, 10]
    assert (mask >> 300) & 1 == 0  # longer than any: not one of them
    assert may_be(b"Connection", mask) and may_be(b"TE", mask)
    assert not may_be(b"Server", mask) and not may_be(b"x" * 300, mask)


def test_client_response_head_drops_hop_by_hop_in_any_case() -> None:
    """Headers whose names have a hop-by-hop name's length but are not one
    (Content-Type, Expires) pass; the hop-by-hop ones go whatever their case."""
    kept = [(b"Content-Type", b"a/b"), (b"Expires", b"0"), (b"X-Request-Id", b"up")]
    dropped = [(name.upper(), b"x") for name in sorted(HOP_BY_HOP - {b"connection"})]
    head = client_response_head(
        200, b"OK", kept + dropped + [(b"CONNECTION", b"keep-alive")], framing="length",
        keep_alive=True, request_id=b"r",
    )  # fmt: skip
    assert head == (
        b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nExpires: 0\r\nX-Request-Id: up\r\n\r\n"
    )
