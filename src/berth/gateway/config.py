"""Typed configuration of the gateway (one object shared by data path and control)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from berth.config import ComponentConfig


class GatewayConfig(ComponentConfig):
    host: str = "0.0.0.0"
    port: int = Field(3130, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(3132, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    data_dir: Path = Path("berth-data")
    store_url: str = Field("http://127.0.0.1:3131", pattern=r"^https?://")
    # Sent to the store and required on admin writes.
    token: str | None = Field(None, min_length=8)

    # Active and passive health checks (defaults for clusters that set none).
    health_type: Literal["tcp", "http", "none"] = "tcp"
    health_path: str = Field("/", pattern=r"^/[!-~]*$")  # for http checks
    health_interval: float = Field(5.0, gt=0)
    health_timeout: float = Field(2.0, gt=0)
    health_rise: int = Field(2, ge=1)
    health_fall: int = Field(3, ge=1)
    max_fails: int = Field(3, ge=0)  # consecutive failures before passive ERR; 0 = off
    fail_timeout: float = Field(10.0, gt=0)
    # Longest a store watch (Consul blocking query) waits before asking again, seconds.
    discovery_wait: float = Field(300.0, ge=1, le=600)

    # Client side: nginx's client_header_timeout / keepalive_timeout / send_timeout.
    client_header_timeout: float = Field(15.0, gt=0)
    client_idle_timeout: float = Field(15.0, gt=0)
    client_body_timeout: float = Field(60.0, gt=0)
    client_send_timeout: float = Field(60.0, gt=0)
    limit_url_bytes: int = Field(8192, ge=256)
    limit_header_bytes: int = Field(32768, ge=1024)
    limit_header_count: int = Field(100, ge=8)
    # How many parsed requests may wait behind the one in flight on one connection.
    limit_pipeline: int = Field(16, ge=1)
    # Bytes of body the gateway holds per direction per connection before it
    # stops reading (the high-water mark; reading resumes at a quarter of it).
    buffer_high_water: int = Field(256 * 1024, ge=4096)
    # Request bodies up to this size are kept so a retry can resend them.
    retry_buffer_bytes: int = Field(64 * 1024, ge=0)

    # Upstream keep-alive pool, per server and per worker.
    upstream_keepalive: int = Field(128, ge=0)
    upstream_idle_timeout: float = Field(60.0, gt=0)

    shutdown_grace: float = Field(30.0, ge=0)

    access_log: bool = True
    access_log_max_bytes: int = Field(100 * 1024 * 1024, ge=1024)
    access_log_backups: int = Field(5, ge=1)
    access_log_buffer: int = Field(100_000, ge=100)  # records waiting for the writer

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs" / "gateway"
