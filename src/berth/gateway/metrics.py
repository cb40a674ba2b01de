"""The gateway's Prometheus metrics (per worker process), rendered as text.

With ``--workers N`` each worker keeps its own registry; ``snapshot`` /
``from_snapshot`` carry one across processes as JSON and ``merged`` sums
them (counters, histogram buckets and gauges alike), which is what worker 0's
admin API renders (see workers.py).

Hand-rolled rather than prometheus_client: every proxied request updates
about six series, and prometheus_client takes a lock and resolves label
children on each update, which costs a visible share of the per-request
budget in a single-threaded event loop that needs neither.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class RouteMetrics:
    """One route's requests by status and its latency histogram: the proxy
    finds it with one lookup per request and updates it in place."""

    __slots__ = ("counts", "statuses", "sum")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def count(self, status: int, n: int = 1) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + n

    def observe(self, status: int, seconds: float) -> None:
        self.count(status)
        # A scan from the smallest bucket, not bisect: most requests land in
        # the first ones, and compiled (setup.py) this is a few float compares.
        i = 0
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                break
            i += 1
        self.counts[i] += 1
        self.sum += seconds


class Metrics:
    def __init__(self) -> None:
        self.routes: dict[str, RouteMetrics] = {}
        self.tries: dict[str, dict[str, int]] = {}  # cluster -> outcome -> attempts
        self.bytes_in = 0
        self.bytes_out = 0
        self.connections_active = 0
        self.connections_total = 0
        self.access_log_dropped = 0
        self.access_log_written = 0

    def __repr__(self) -> str:
        return (
            f"<Metrics requests={self.requests_total()} "
            f"connections_active={self.connections_active}>"
        )

    def route(self, name: str) -> RouteMetrics:
        found = self.routes.get(name)
        if found is None:
            found = self.routes[name] = RouteMetrics()
        return found

    def try_counts(self) -> list[tuple[str, str, int]]:
        """Upstream attempts as (cluster, outcome, count) rows."""
        return [
            (cluster, outcome, n)
            for cluster, outcomes in self.tries.items()
            for outcome, n in outcomes.items()
        ]

    def requests_total(self) -> int:
        return sum(n for m in self.routes.values() for n in m.statuses.values())

    def observe_request(
        self, route: str, status: int, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        self.route(route).observe(status, seconds)
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def observe_try(self, cluster: str, outcome: str, n: int = 1) -> None:
        outcomes = self.tries.get(cluster)
        if outcomes is None:
            outcomes = self.tries[cluster] = {}
        outcomes[outcome] = outcomes.get(outcome, 0) + n

    # -- across workers -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything as plain JSON (tuple keys become lists)."""
        return {
            "requests": [
                [route, status, n]
                for route, m in self.routes.items()
                for status, n in m.statuses.items()
            ],
            "latency": {r: {"counts": m.counts, "sum": m.sum} for r, m in self.routes.items()},
            "tries": [list(row) for row in self.try_counts()],
            **{name: getattr(self, name) for name in _SCALARS},
        }

    @classmethod
    def from_snapshot(cls, doc: Any) -> Metrics:
        """The inverse of ``snapshot``; ValueError when the document is not one."""
        try:
            m = cls()
            for route, status, n in doc["requests"]:
                m.route(as_str(route)).count(as_int(status), as_int(n))
            for route, hist in doc["latency"].items():
                counts = [as_int(c) for c in hist["counts"]]
                if len(counts) != len(LATENCY_BUCKETS) + 1:
                    raise TypeError("latency: wrong number of buckets")
                h = m.route(as_str(route))
                h.counts = counts
                h.sum = as_num(hist["sum"])
            for cluster, outcome, n in doc["tries"]:
                m.observe_try(as_str(cluster), as_str(outcome), as_int(n))
            for name in _SCALARS:
                setattr(m, name, as_int(doc[name]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a metrics snapshot: {exc!r}") from None
        return m

    @classmethod
    def merged(cls, parts: Iterable[Metrics]) -> Metrics:
        """One registry summing every part, as nginx-module-vts sums its workers."""
        total = cls()
        for m in parts:
            for route, part in m.routes.items():
                into = total.route(route)
                for status, n in part.statuses.items():
                    into.count(status, n)
                into.counts = [a + b for a, b in zip(into.counts, part.counts, strict=True)]
                into.sum += part.sum
            for cluster, outcome, n in m.try_counts():
                total.observe_try(cluster, outcome, n)
            for name in _SCALARS:
                setattr(total, name, getattr(total, name) + getattr(m, name))
        return total

    def render(self) -> str:
        out: list[str] = []
        add = out.append
        add("# HELP berth_gateway_requests_total Requests answered, by route and status.")
        add("# TYPE berth_gateway_requests_total counter")
        for route, m in sorted(self.routes.items()):
            for status, n in sorted(m.statuses.items()):
                add(f'berth_gateway_requests_total{{route="{_esc(route)}",status="{status}"}} {n}')
        add("# HELP berth_gateway_request_seconds Time from request head to response end.")
        add("# TYPE berth_gateway_request_seconds histogram")
        for route, hist in sorted(self.routes.items()):
            label = f'route="{_esc(route)}"'
            total = 0
            for bound, count in zip(LATENCY_BUCKETS, hist.counts, strict=False):
                total += count
                add(f'berth_gateway_request_seconds_bucket{{{label},le="{bound}"}} {total}')
            total += hist.counts[-1]
            add(f'berth_gateway_request_seconds_bucket{{{label},le="+Inf"}} {total}')
            add(f"berth_gateway_request_seconds_sum{{{label}}} {hist.sum:.6f}")
            add(f"berth_gateway_request_seconds_count{{{label}}} {total}")
        add("# HELP berth_gateway_upstream_tries_total Upstream attempts, by cluster and outcome.")
        add("# TYPE berth_gateway_upstream_tries_total counter")
        for cluster, outcome, n in sorted(self.try_counts()):
            add(
                f'berth_gateway_upstream_tries_total{{cluster="{_esc(cluster)}",'
                f'outcome="{outcome}"}} {n}'
            )
        for name, kind, help_, value in (
            ("received_bytes_total", "counter", "Request body bytes from clients.", self.bytes_in),
            ("sent_bytes_total", "counter", "Response body bytes to clients.", self.bytes_out),
            ("connections_active", "gauge", "Open client connections.", self.connections_active),
            ("connections_total", "counter", "Accepted client connections.",
             self.connections_total),
            ("access_log_written_total", "counter", "Access records written.",
             self.access_log_written),
            ("access_log_dropped_total", "counter", "Access records dropped (buffer full).",
             self.access_log_dropped),
        ):  # fmt: skip
            add(f"# HELP berth_gateway_{name} {help_}")
            add(f"# TYPE berth_gateway_{name} {kind}")
            add(f"berth_gateway_{name} {value}")
        return "\n".join(out) + "\n"


_SCALARS: Final = (
    "bytes_in",
    "bytes_out",
    "connections_active",
    "connections_total",
    "access_log_dropped",
    "access_log_written",
)


# Type checks for snapshot JSON read back (here and in workers.py): a peer's
# answer is data from another process, never trusted to have the right shape.
def as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def as_num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# One registry per worker process, as with nginx's per-worker counters.
METRICS = Metrics()


def render() -> str:
    """Prometheus text for this worker (the admin API appends upstream health gauges)."""
    return METRICS.render()
