from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from berth.config import ComponentConfig, load


class StoreConfig(ComponentConfig):
    data_dir: Path = Path("berth-data/store")
    # NORMAL in WAL mode survives the death of the process (kill -9); FULL also
    # survives power loss, at one fsync per group commit.
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    node_name: Annotated[str, Field(min_length=1)] = "berth"
    datacenter: Annotated[str, Field(min_length=1)] = "dc1"
    advertise_address: str = "127.0.0.1"

    limit_value_bytes: Annotated[int, Field(ge=1)] = 512 * 1024
    limit_txn_ops: Annotated[int, Field(ge=1)] = 128
    limit_txn_bytes: Annotated[int, Field(ge=1)] = 512 * 1024
    limit_body_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024
    limit_check_concurrency: Annotated[int, Field(ge=1)] = 32

    # Blocking queries: Consul's defaults (5m, capped at 10m, jitter up to wait/16).
    wait_default_s: Annotated[float, Field(gt=0)] = 300.0
    wait_max_s: Annotated[float, Field(gt=0)] = 600.0

    # Session TTLs: Consul accepts 10s..24h and invalidates after TTL * 2.
    session_ttl_min_s: Annotated[float, Field(gt=0)] = 10.0
    session_ttl_max_s: Annotated[float, Field(gt=0)] = 86400.0
    session_ttl_multiplier: Annotated[float, Field(ge=1.0)] = 2.0

    # Services critical longer than DeregisterCriticalServiceAfter are reaped;
    # Consul's floor is 1m and its reaper runs every 30s.
    deregister_min_s: Annotated[float, Field(ge=0)] = 60.0
    reap_interval_s: Annotated[float, Field(gt=0)] = 30.0
    # Deleted keys keep a tombstone so prefix indexes never go backwards early.
    tombstone_ttl_s: Annotated[float, Field(gt=0)] = 900.0

    @model_validator(mode="after")
    def _check_ranges(self) -> StoreConfig:
        if self.wait_default_s > self.wait_max_s:
            raise ValueError("wait_default_s must not exceed wait_max_s")
        if self.session_ttl_min_s > self.session_ttl_max_s:
            raise ValueError("session_ttl_min_s must not exceed session_ttl_max_s")
        return self


def load_store_config(data_dir: Path) -> StoreConfig:
    """The store's config: ``[store]`` in berth.toml and BERTH_* env over the
    defaults, in the data directory the control plane gives it."""
    return load(StoreConfig, "store", {"data_dir": data_dir})
