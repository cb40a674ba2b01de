"""Resource limits for task processes, like Docker's: cgroup v2, else v1, else rlimits.

Where the cgroups go: on v1 each task gets ``berth/<task-id>`` *under the
control plane's own cgroup* in the memory and cpu hierarchies, so tasks stay
inside whatever accounting the host put berth in (v1 allows nesting under a
cgroup that has processes). v2 forbids that ("no internal processes"), so
there tasks go under ``/sys/fs/cgroup/berth/`` as Docker's cgroupfs driver
does. Whatever is not permitted (read-only cgroupfs, no root, controller not
delegated) falls back to rlimits (RLIMIT_AS from ``mem``; there is no rlimit
for a CPU share), and the task records which is in force.
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("berth.scheduler.limits")

Kind = Literal["cgroup-v2", "cgroup-v1", "rlimit", "none"]
CGROUP_ROOT = Path("/sys/fs/cgroup")
CFS_PERIOD_US = 100_000
MIB = 1024 * 1024


@dataclass(frozen=True)
class Prepared:
    """What the child does between fork and exec: join these cgroups, set these rlimits."""

    kind: Kind
    procs_files: tuple[str, ...] = ()
    rlimit_as: int | None = None

    def apply_in_child(self) -> None:
        # Runs in the forked child before exec: only syscalls, nothing that takes locks.
        pid = str(os.getpid()).encode()
        for path in self.procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)
        if self.rlimit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (self.rlimit_as, self.rlimit_as))


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _own_cgroup(controller: str) -> str | None:
    """This process's cgroup path in the v1 hierarchy of ``controller`` ('' key = v2)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


def _v1_mount(controller: str) -> Path | None:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = right.split()
        if len(fields) >= 3 and fields[0] == "cgroup" and controller in fields[2].split(","):
            return Path(left.split()[4])
    return None


class Limiter:
    """Creates and removes per-task cgroups; ``kind`` says which mechanism is in force."""

    def __init__(self, mode: Literal["auto", "cgroup", "rlimit", "none"] = "auto") -> None:
        self.kind: Kind = "none"
        self._parents: dict[str, Path] = {}
        if mode == "none":
            return
        if mode in ("auto", "cgroup"):
            try:
                self._setup_cgroups()
            except OSError as exc:
                if mode == "cgroup":
                    # Asked for explicitly: fail the start rather than run unlimited-ish.
                    raise RuntimeError(
                        f"limits = 'cgroup' but cgroups are unusable: {exc}"
                    ) from exc
                log.info("cgroup limits unavailable here (%s); using rlimits", exc)
                self._parents = {}
        if self.kind == "none":
            self.kind = "rlimit"

    def __repr__(self) -> str:
        return f"<Limiter {self.kind} parents={[str(p) for p in self._parents.values()]}>"

    def _setup_cgroups(self) -> None:
        controllers = CGROUP_ROOT / "cgroup.controllers"
        if controllers.exists():
            available = controllers.read_text().split()
            if "memory" not in available or "cpu" not in available:
                raise OSError("cgroup v2 without the memory and cpu controllers")
            enabled = (CGROUP_ROOT / "cgroup.subtree_control").read_text().split()
            missing = [c for c in ("memory", "cpu") if c not in enabled]
            if missing:
                _write(CGROUP_ROOT / "cgroup.subtree_control", " ".join("+" + c for c in missing))
            parent = CGROUP_ROOT / "berth"
            parent.mkdir(exist_ok=True)
            _write(parent / "cgroup.subtree_control", "+memory +cpu")
            self._parents = {"unified": parent}
            self.kind = "cgroup-v2"
            return
        for controller in ("memory", "cpu"):
            mount = _v1_mount(controller)
            own = _own_cgroup(controller)
            if mount is None or own is None:
                raise OSError(f"no cgroup v1 {controller} hierarchy")
            parent = mount / own.lstrip("/") / "berth"
            parent.mkdir(exist_ok=True)
            self._parents[controller] = parent
        # Probe that limits can really be written (read-only or non-root cgroupfs fails here).
        probe = self._parents["memory"] / "probe"
        probe.mkdir(exist_ok=True)
        try:
            _write(probe / "memory.limit_in_bytes", str(64 * MIB))
        finally:
            probe.rmdir()
        self.kind = "cgroup-v1"
        # The parents exist only while tasks do (see release): a control plane that is
        # killed, or built and never started, leaves nothing in the host's cgroup.
        self._remove_empty_parents()

    @property
    def parent_dirs(self) -> list[Path]:
        return list(self._parents.values())

    def _dirs(self, task_id: str) -> list[Path]:
        return [parent / task_id for parent in self._parents.values()]

    def prepare(self, task_id: str, cpus: float, mem_mib: float) -> Prepared:
        """Create the task's cgroups with its limits (I/O, before fork)."""
        mem = int(mem_mib * MIB) if mem_mib > 0 else None
        quota = int(cpus * CFS_PERIOD_US) if cpus > 0 else None
        if self.kind == "cgroup-v2":
            (d,) = self._dirs(task_id)
            d.mkdir(exist_ok=True)
            if mem is not None:
                _write(d / "memory.max", str(mem))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
            if quota is not None:
                _write(d / "cpu.max", f"{max(quota, 1000)} {CFS_PERIOD_US}")
            return Prepared("cgroup-v2", procs_files=(str(d / "cgroup.procs"),))
        if self.kind == "cgroup-v1":
            mem_dir = self._parents["memory"] / task_id
            cpu_dir = self._parents["cpu"] / task_id
            # parents=True: another scheduler sharing this cgroup may have just removed
            # the (then empty) berth/ parent on its way out.
            mem_dir.mkdir(parents=True, exist_ok=True)
            cpu_dir.mkdir(parents=True, exist_ok=True)
            if mem is not None:
                _write(mem_dir / "memory.limit_in_bytes", str(mem))
                # memsw = mem means no swap beyond the limit, as Docker's --memory alone.
                if (mem_dir / "memory.memsw.limit_in_bytes").exists():
                    _write(mem_dir / "memory.memsw.limit_in_bytes", str(mem))
            if quota is not None:
                _write(cpu_dir / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                _write(cpu_dir / "cpu.cfs_quota_us", str(max(quota, 1000)))
            return Prepared(
                "cgroup-v1",
                procs_files=(str(mem_dir / "cgroup.procs"), str(cpu_dir / "cgroup.procs")),
            )
        if self.kind == "rlimit":
            return Prepared("rlimit", rlimit_as=mem)
        return Prepared("none")

    def in_force(self, task_id: str) -> dict[str, int | None]:
        """The memory limit (bytes) and CPU quota (µs per 100 ms) the kernel holds for a task."""
        if self.kind == "cgroup-v2":
            d = self._parents["unified"] / task_id
            mem = (d / "memory.max").read_text().strip()
            quota = (d / "cpu.max").read_text().split()[0]
            return {
                "memory": None if mem == "max" else int(mem),
                "cpu_quota": None if quota == "max" else int(quota),
            }
        if self.kind == "cgroup-v1":
            mem_v1 = int((self._parents["memory"] / task_id / "memory.limit_in_bytes").read_text())
            quota_v1 = int((self._parents["cpu"] / task_id / "cpu.cfs_quota_us").read_text())
            return {"memory": mem_v1, "cpu_quota": None if quota_v1 < 0 else quota_v1}
        return {"memory": None, "cpu_quota": None}

    def oom_killed(self, task_id: str) -> bool:
        """Whether the kernel OOM-killed a process of the task's memory cgroup."""
        if self.kind == "cgroup-v2":
            events = self._parents["unified"] / task_id / "memory.events"
        elif self.kind == "cgroup-v1":
            events = self._parents["memory"] / task_id / "memory.oom_control"
        else:
            return False
        try:
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def pids(self, task_id: str) -> list[int]:
        """Processes still in the task's cgroup (descendants that left its process group)."""
        found: set[int] = set()
        for d in self._dirs(task_id):
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        return sorted(found)

    def release(self, task_id: str) -> None:
        for d in self._dirs(task_id):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", d, exc)
        self._remove_empty_parents()

    def _remove_empty_parents(self) -> None:
        # v1 only: there the parents sit inside the control plane's own cgroup. The v2
        # parent (/sys/fs/cgroup/berth, with its subtree_control) stays, as Docker's does.
        if self.kind != "cgroup-v1":
            return
        for parent in self._parents.values():
            try:
                parent.rmdir()
            except OSError:
                pass  # still holds tasks (ours or another scheduler's): fine

    def close(self) -> None:
        self._remove_empty_parents()
