"""Prometheus metrics of one service, in its own registry (tests run many apps per process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from berth.services.pool import WorkPool

# Thumbnails of phone photos take tens of ms; 50 MP PNGs take seconds.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    def __init__(self, service: str, pool: WorkPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "berth_service_requests",
            "Requests answered, by status code.",
            ["service", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "berth_service_errors",
            "Requests answered with an error, by error code.",
            ["service", "code"],
            registry=self.registry,
        )
        self.processing = Histogram(
            "berth_service_processing_seconds",
            "Time spent on an image in a worker thread.",
            ["service"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        queue = Gauge(
            "berth_service_queue_depth",
            "Requests admitted and waiting for a worker.",
            ["service"],
            registry=self.registry,
        )
        queue.labels(service).set_function(lambda: pool.queued)
        running = Gauge(
            "berth_service_in_progress",
            "Requests being processed by a worker.",
            ["service"],
            registry=self.registry,
        )
        running.labels(service).set_function(lambda: pool.running)
        self.service = service

    def __repr__(self) -> str:
        return f"<ServiceMetrics {self.service}>"

    def observe(self, status: int, error_code: str | None) -> None:
        self.requests.labels(self.service, str(status)).inc()
        if error_code is not None:
            self.errors.labels(self.service, error_code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
