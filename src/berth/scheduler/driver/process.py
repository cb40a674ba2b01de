"""The embedded driver: each task is a child process of the control plane.

Design (orphans and restarts): tasks die with the control plane. Every task is
started in its own session/process group with ``PR_SET_PDEATHSIG=SIGKILL``, so
if the control plane is killed (even by SIGKILL) the kernel kills the task
leader, and the reaper sidecar (``reaper.py``) kills the rest of each task
(``sh -c`` forks the real program, which PDEATHSIG does not reach). On the
next start the scheduler reaps anything still carrying a stored task's
``MESOS_TASK_ID`` and starts fresh tasks. Re-adopting live tasks instead was
rejected: a task's stdout/stderr pipe runs through the control plane (that is
how the json-file logs are written), so a task outliving it would write into a
closed pipe, unsupervised and unlogged, until someone restarted berth. ``berth
up`` relies on this: after the control plane exits, no task process remains.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

import psutil

from berth.scheduler.driver.base import Exit, LaunchSpec
from berth.scheduler.driver.limits import Limiter, Prepared
from berth.scheduler.errors import LaunchFailed, UnsupportedApp
from berth.scheduler.models import AppDefinition
from berth.scheduler.tasklog import Stream, TaskLog

log = logging.getLogger("berth.scheduler.driver")

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
# Docker's json-file driver splits lines at 16 KiB; so do we, to bound memory per task.
MAX_LINE = 16 * 1024
RLIMIT_MARKERS = (b"MemoryError", b"Cannot allocate memory", b"std::bad_alloc", b"out of memory")


def die_with_parent(parent_pid: int) -> None:
    """For ``preexec_fn``: the kernel SIGKILLs the child when the control plane dies."""
    # Runs between fork and exec: only syscalls, no allocation-heavy Python.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        # The control plane died before prctl took effect: nobody would supervise us.
        os._exit(1)


def _child_setup(parent_pid: int, prepared: Prepared) -> None:
    die_with_parent(parent_pid)
    prepared.apply_in_child()


def kill_tagged(task_id: str) -> int:
    """SIGKILL every process carrying ``MESOS_TASK_ID=task_id`` (a process-table scan)."""
    killed = 0
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("MESOS_TASK_ID") == task_id:
                proc.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


class ProcessTask:
    """One running task process, its log pumps and its cgroup."""

    def __init__(
        self,
        spec: LaunchSpec,
        proc: asyncio.subprocess.Process,
        outputs: tuple[int, int],
        limiter: Limiter,
        limits_in_force: str,
        tasklog: TaskLog,
        sandbox: Path,
    ) -> None:
        self.spec = spec
        self.pid = proc.pid
        try:
            self.create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            self.create_time = 0.0
        self.limits_in_force = limits_in_force
        self._proc = proc
        self._limiter = limiter
        self._log = tasklog
        self._sandbox = sandbox
        self._stopping = False
        self._stderr_tail = b""
        self._log_failed = False
        # Our own pipes, not asyncio's: its Process.wait() also waits for those to close,
        # so a descendant holding stdout would hide the leader's exit (dead task "running").
        self._outputs = [os.fdopen(fd, "rb", buffering=0) for fd in outputs]
        self._pumps = [
            asyncio.ensure_future(self._pump(self._outputs[0], "stdout")),
            asyncio.ensure_future(self._pump(self._outputs[1], "stderr")),
        ]
        self._exit: asyncio.Future[Exit] = asyncio.ensure_future(self._supervise())

    def __repr__(self) -> str:
        state = "exited" if self._exit.done() else "stopping" if self._stopping else "running"
        return f"<ProcessTask {self.spec.task_id} pid={self.pid} {state} {self.limits_in_force}>"

    async def _pump(self, pipe: IO[bytes], name: Stream) -> None:
        stream = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), pipe
        )
        try:
            pending = b""
            while chunk := await stream.read(65536):
                if name == "stderr":
                    self._stderr_tail = (self._stderr_tail + chunk)[-4096:]
                pending += chunk
                *lines, pending = pending.split(b"\n")
                pieces = [line + b"\n" for line in lines]
                while len(pending) >= MAX_LINE:
                    pieces.append(pending[:MAX_LINE])
                    pending = pending[MAX_LINE:]
                self._write(pieces, name)
            if pending:
                self._write([pending], name)
        finally:
            transport.close()

    def _write(self, pieces: list[bytes], name: Stream) -> None:
        # A log that cannot be written (disk full, rotation failing) loses lines; the pump
        # must keep reading anyway, or the task blocks forever on a full pipe.
        try:
            for piece in pieces:
                self._log.write(piece.decode("utf-8", "replace"), name)
            self._log.flush()
        except (OSError, ValueError) as exc:
            if not self._log_failed:
                log.warning(
                    "task %s: log %s unwritable, dropping output: %s",
                    self.spec.task_id,
                    self._log.path,
                    exc,
                )
            self._log_failed = True

    def _signal_all(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        # Descendants that left the process group are still in the task's cgroup.
        for pid in self._limiter.pids(self.spec.task_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    async def _supervise(self) -> Exit:
        returncode = await self._proc.wait()
        # The task is over when its leader is; nothing it forked may outlive it
        # (as when Mesos tears down a container).
        self._signal_all(signal.SIGKILL)
        if not self.limits_in_force.startswith("cgroup"):
            # No cgroup holds what left the process group (setsid): find it by its env.
            await asyncio.to_thread(kill_tagged, self.spec.task_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await asyncio.gather(*self._pumps, return_exceptions=True)
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for pipe in self._outputs:
            pipe.close()  # a pump cancelled before it started never took it over
        self._log.close()
        oom = returncode != 0 and self._limiter.oom_killed(self.spec.task_id)
        limit = "cgroup"
        if not oom and returncode != 0 and self.limits_in_force == "rlimit" and not self._stopping:
            # Under RLIMIT_AS nothing kills the task: an allocation fails and the
            # runtime says so on stderr, which is the only evidence there is.
            oom = any(marker in self._stderr_tail for marker in RLIMIT_MARKERS)
            limit = "rlimit"
        await self._release_cgroup()
        shutil.rmtree(self._sandbox, ignore_errors=True)
        return Exit(
            returncode=returncode, oom=oom, killed_by_us=self._stopping and not oom, limit=limit
        )

    async def _release_cgroup(self) -> None:
        # Killed processes leave their cgroup a moment after the leader is reaped;
        # nothing signals that, so poll briefly with a deadline.
        for _ in range(100):
            if not self._limiter.pids(self.spec.task_id):
                break
            await asyncio.sleep(0.02)
        self._limiter.release(self.spec.task_id)

    async def wait(self) -> Exit:
        return await asyncio.shield(self._exit)

    def on_exit(self, callback: Callable[[], None]) -> None:
        self._exit.add_done_callback(lambda _: callback())

    async def stop(self, grace_seconds: float) -> Exit:
        """SIGTERM to the task's process group, the grace period, then SIGKILL."""
        self._stopping = True
        if not self._exit.done():
            self._signal_all(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_seconds):
                    await asyncio.shield(self._exit)
            except TimeoutError:
                self._signal_all(signal.SIGKILL)
        return await self.wait()


REAPER = Path(__file__).with_name("reaper.py")


class Reaper:
    """The control plane's end of the reaper sidecar's stdin pipe."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        # The "add" line of every live task: a sidecar started anew (the previous one was
        # killed) must cover the tasks launched before it too, not only later ones.
        self._adds: dict[str, str] = {}

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"<Reaper pid={pid} tasks={len(self._adds)}>"

    def _send(self, line: str) -> None:
        lines = [line]
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, str(REAPER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            lines = list(self._adds.values())
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write("".join(f"{item}\n" for item in lines).encode())
            self._proc.stdin.flush()
        except OSError as exc:
            log.warning("reaper sidecar unavailable (%s); tasks may outlive a crash", exc)

    def add(self, task_id: str, pgid: int, procs_files: tuple[str, ...]) -> None:
        self._adds[task_id] = " ".join(["add", task_id, str(pgid), *procs_files])
        self._send(self._adds[task_id])

    def remove(self, task_id: str) -> None:
        self._adds.pop(task_id, None)
        if self._proc is not None:
            self._send(f"del {task_id}")

    def close(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(OSError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


class ProcessDriver:
    def __init__(
        self,
        sandbox_dir: Path,
        limiter: Limiter,
        log_max_size: int,
        log_max_files: int,
    ) -> None:
        self.sandbox_dir = sandbox_dir
        self.limiter = limiter
        self.log_max_size = log_max_size
        self.log_max_files = log_max_files
        self.reaper = Reaper()

    def __repr__(self) -> str:
        return f"<ProcessDriver limits={self.limiter.kind} sandboxes={self.sandbox_dir}>"

    def check(self, app: AppDefinition) -> None:
        if app.container_image is not None:
            raise UnsupportedApp(
                "/container/docker/image",
                f"container.docker.image ({app.container_image}) needs a Docker driver; "
                "berth's process driver runs cmd/args as local processes",
            )
        if app.cmd is None and app.args is None:
            raise UnsupportedApp("/cmd", "the process driver needs cmd or args")

    async def launch(self, spec: LaunchSpec) -> ProcessTask:
        sandbox = self.sandbox_dir / spec.task_id
        sandbox.mkdir(parents=True, exist_ok=True)
        try:
            prepared = self.limiter.prepare(spec.task_id, spec.cpus, spec.mem)
        except OSError as exc:
            raise LaunchFailed(f"cannot set resource limits: {exc}") from exc
        argv = ["/bin/sh", "-c", spec.cmd] if spec.cmd is not None else list(spec.args or ())
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MESOS_SANDBOX": str(sandbox)}
        env.update(spec.env)
        tasklog = TaskLog(spec.log_path, self.log_max_size, self.log_max_files)
        parent = os.getpid()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env=env,
                cwd=sandbox,
                start_new_session=True,
                preexec_fn=lambda: _child_setup(parent, prepared),
            )
        except BaseException as exc:
            os.close(out_r)
            os.close(err_r)
            if not isinstance(exc, OSError | ValueError | subprocess.SubprocessError):
                raise
            # ValueError: e.g. a NUL byte in argv/env (models reject those; belt and braces).
            tasklog.write(f"berth: cannot start task: {exc}\n", "stderr")
            tasklog.close()
            self.limiter.release(spec.task_id)
            shutil.rmtree(sandbox, ignore_errors=True)
            raise LaunchFailed(f"cannot start {argv[0]!r}: {exc}") from exc
        finally:
            os.close(out_w)
            os.close(err_w)
        self.reaper.add(spec.task_id, proc.pid, prepared.procs_files)
        task = ProcessTask(
            spec, proc, (out_r, err_r), self.limiter, prepared.kind, tasklog, sandbox
        )
        task.on_exit(lambda: self.reaper.remove(spec.task_id))
        return task

    def reap_orphans(self, tasks: Mapping[str, tuple[int | None, float | None]]) -> int:
        """Kill every process that belongs to one of ``tasks`` (left by a dead control plane).

        Matched by the ``MESOS_TASK_ID`` every task process and its descendants inherit,
        so a recycled pid is never hit; the stored pid + create_time catch a leader
        that scrubbed its environment.
        """
        if not tasks:
            return 0
        me = os.getpid()
        killed = 0
        leaders = {pid: ct for pid, ct in tasks.values() if pid}
        for proc in psutil.process_iter(["pid", "create_time"]):
            if proc.pid == me:
                continue
            try:
                ours = proc.pid in leaders and proc.info["create_time"] == leaders[proc.pid]
                if not ours:
                    ours = proc.environ().get("MESOS_TASK_ID") in tasks
                if ours:
                    proc.kill()
                    killed += 1
            except (psutil.Error, OSError):
                continue
        for task_id in tasks:
            self.limiter.release(task_id)
        return killed

    def close(self) -> None:
        self.reaper.close()
        self.limiter.close()
