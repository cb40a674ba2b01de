from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from berth.config import ComponentConfig


class SchedulerConfig(ComponentConfig):
    data_dir: Path = Path("berth-data/scheduler")
    # Task logs live beside the other components' logs so one agent tails them all.
    log_dir: Path | None = None
    # Host ports handed to tasks (Marathon's default service-port range).
    port_range_min: int = Field(10000, ge=1024, le=65535)
    port_range_max: int = Field(20000, ge=1024, le=65535)
    # The address tasks bind and are advertised at (catalog, task JSON, $HOST).
    host: str = "127.0.0.1"
    # At control-plane shutdown no task gets longer than this to exit after SIGTERM,
    # whatever its taskKillGracePeriodSeconds, so stopping berth stays bounded.
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    log_max_size_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    log_max_files: int = Field(3, ge=1, le=100)
    # Logs of this many ended tasks are kept per app (crash loops would grow without end).
    log_keep_ended_tasks: int = Field(20, ge=0)
    # auto = cgroup v2, else v1, else rlimits; "rlimit" forces rlimits; "none" disables limits.
    limits: Literal["auto", "cgroup", "rlimit", "none"] = "auto"
    # A task that stays RUNNING (and healthy) this long resets its app's launch backoff.
    backoff_reset_seconds: float = Field(10.0, ge=0)
    # Until a task's first successful health check it is probed this often (at most its
    # intervalSeconds); failures there are inside the grace period and ignored anyway,
    # so this only makes new tasks healthy sooner.
    health_initial_probe_seconds: float = Field(0.25, gt=0)
    # After a task leaves the catalog and before its SIGTERM: gateways watching the
    # store need this long to stop sending it new requests (skipped at shutdown).
    drain_seconds: float = Field(1.0, ge=0)
    # How long to retry store writes that must land before acting (deregister before kill).
    store_ack_timeout_seconds: float = Field(5.0, gt=0)
    # Store recovery at start: retry reading state with backoff up to this cap per attempt.
    store_retry_max_delay_seconds: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _check_range(self) -> SchedulerConfig:
        if self.port_range_min > self.port_range_max:
            raise ValueError("port_range_min must not exceed port_range_max")
        return self

    @property
    def task_log_dir(self) -> Path:
        return self.log_dir if self.log_dir is not None else self.data_dir.parent / "logs" / "tasks"
