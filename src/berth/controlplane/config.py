from __future__ import annotations

from pathlib import Path

from pydantic import Field

from berth.config import ComponentConfig


class ControlPlaneConfig(ComponentConfig):
    host: str = "127.0.0.1"
    port: int = Field(3131, ge=0, le=65535)
    data_dir: Path = Path("berth-data")
    # When set, every API request must carry it (X-Consul-Token, ?token= or
    # Authorization: Bearer); /health and /ping stay open for probes.
    token: str | None = Field(None, min_length=8)
    # An external Consul to use instead of the embedded store (None = embedded).
    store_url: str | None = Field(None, pattern=r"^https?://")
