"""One typed config per service; both share the HTTP shell's limits.

Loaded with :func:`berth.config.load` from the ``[imageinfo]`` / ``[imgprocess]``
table of berth.toml, ``BERTH_*`` variables and flags.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from berth.config import ComponentConfig

ServiceName = Literal["imageinfo", "imgprocess"]


def cgroup_cpus(cpu_max: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line ("200000 100000" -> 2.0, "max ..." -> None)."""
    quota, _, period = cpu_max.strip().partition(" ")
    if quota == "max" or not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None
    return int(quota) / int(period)


def _cores() -> int:
    # The scheduler may pin us to fewer cores than the host has, by affinity
    # or by a cgroup CPU quota.
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as fh:
            quota = cgroup_cpus(fh.read())
    except OSError:
        quota = None
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def default_workers() -> int:
    """One worker per core, plus one.

    A worker also waits: for libvips' own thread, which runs its resize and
    encode, and for the GIL. With one per core its core then idles unless another
    has work in hand. Measured on 2 cores with 4 concurrent 24 MP thumbnails:
    machine idle 3.5% -> 1.5%, 2-3% more JPEG and PNG thumbnails/s, the same CPU
    per thumbnail; a fourth added nothing.
    """
    return _cores() + 1


class ServiceConfig(ComponentConfig):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    # Threads processing images (see default_workers).
    workers: int = Field(default_factory=default_workers, ge=1, le=256)
    # Requests admitted beyond the running ones; above this the answer is 503.
    # Bodies are read only once admitted, so uploads held in memory are at most
    # (workers + limit_queue) x limit_body_bytes.
    limit_queue: int = Field(default=8, ge=0, le=10_000)
    limit_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    limit_width: int = Field(default=20_000, ge=1)
    limit_height: int = Field(default=20_000, ge=1)
    # Summed over animation frames, as imgproxy does: a 1000-frame GIF of a
    # small size costs as much as one huge still.
    limit_pixels: int = Field(default=50_000_000, ge=1)
    limit_frames: int = Field(default=1000, ge=1)
    timeout_processing: float = Field(default=30.0, gt=0)
    # An upload holds its place in the pool while it arrives: without a bound, a
    # few clients that stall mid-body would keep the service at 503 forever.
    # The request head gets as long (then 408), so no connection stalls for ever.
    timeout_body: float = Field(default=60.0, gt=0)
    retry_after_seconds: int = Field(default=1, ge=0)


class ImageInfoConfig(ServiceConfig):
    pass


class ImgProcessConfig(ServiceConfig):
    # Largest output side; stops `/scale/1000` on a big image from allocating gigabytes.
    limit_output_side: int = Field(default=10_000, ge=1)
    # Where `/watermark/url/<base64 path>` images are read from; None disables them.
    watermark_dir: Path | None = None
    quality_default: int = Field(default=80, ge=1, le=100)

    @model_validator(mode="after")
    def _watermark_dir_exists(self) -> ImgProcessConfig:
        if self.watermark_dir is not None and not self.watermark_dir.is_dir():
            raise ValueError(f"watermark_dir {self.watermark_dir} is not a directory")
        return self
