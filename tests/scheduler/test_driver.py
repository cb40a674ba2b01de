"""The process driver with real processes: env, logs, kill, limits, orphans."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from berth.scheduler.driver.base import LaunchSpec, TaskEnv, marathon_env
from berth.scheduler.driver.limits import Limiter
from berth.scheduler.driver.process import ProcessDriver
from berth.scheduler.errors import LaunchFailed, UnsupportedApp
from berth.scheduler.models import parse_app
from berth.scheduler.ports import NoPortsLeft, PortAllocator
from berth.scheduler.tasklog import TaskLog, prune
from tests.scheduler.core_support import await_until, wait_gone


@pytest.fixture
def driver(tmp_path: Path) -> ProcessDriver:
    d = ProcessDriver(tmp_path / "sandboxes", Limiter("auto"), 1 << 20, 3)
    yield d
    d.close()


def spec(tmp_path: Path, task_id: str = "t.1", **kw: object) -> LaunchSpec:
    base: dict[str, object] = {
        "task_id": task_id,
        "app_id": "/t",
        "cmd": None,
        "args": None,
        "env": {"MESOS_TASK_ID": task_id},
        "cpus": 0.5,
        "mem": 256.0,
        "log_path": tmp_path / "logs" / f"{task_id}.log",
    }
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_cmd_runs_under_sh_with_env_and_json_file_log(
    driver: ProcessDriver, tmp_path: Path
) -> None:
    s = spec(
        tmp_path,
        cmd='echo "port=$PORT0 task=$MESOS_TASK_ID"; echo oops >&2; exit 3',
        env={"PORT0": "12345", "MESOS_TASK_ID": "t.1"},
    )
    task = await driver.launch(s)
    assert task.limits_in_force in ("cgroup-v2", "cgroup-v1", "rlimit")
    result = await task.wait()
    assert result.returncode == 3 and not result.oom
    assert result.message == "Command exited with status 3"
    recs = records(s.log_path)
    assert {"log": "port=12345 task=t.1\n", "stream": "stdout"}.items() <= recs[0].items()
    assert any(r["stream"] == "stderr" and r["log"] == "oops\n" for r in recs)
    assert recs[0]["time"].endswith("Z") and len(recs[0]["time"]) == 30
    # The sandbox goes with the task.
    assert not (tmp_path / "sandboxes" / "t.1").exists()


async def test_args_run_directly(driver: ProcessDriver, tmp_path: Path) -> None:
    s = spec(tmp_path, args=(sys.executable, "-c", "import os; print(os.getpgrp() == os.getpid())"))
    task = await driver.launch(s)
    assert (await task.wait()).returncode == 0
    # Its own process group, so a kill reaches everything it forked.
    assert records(s.log_path)[0]["log"] == "True\n"


async def test_missing_executable_fails_the_launch(driver: ProcessDriver, tmp_path: Path) -> None:
    with pytest.raises(LaunchFailed, match="no-such-binary"):
        await driver.launch(spec(tmp_path, args=("/no-such-binary",)))


async def test_stop_sends_sigterm_to_the_whole_group(driver: ProcessDriver, tmp_path: Path) -> None:
    s = spec(tmp_path, cmd="sleep 300 & echo $!; wait")
    task = await driver.launch(s)
    await await_until(lambda: s.log_path.exists() and bool(s.log_path.read_text()))
    child = int(records(s.log_path)[0]["log"])
    result = await task.stop(grace_seconds=10)
    assert result.killed_by_us and result.returncode != 0
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie"


async def test_sigterm_ignored_means_sigkill_after_grace(
    driver: ProcessDriver, tmp_path: Path
) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('up', flush=True); time.sleep(300)"
    )
    s = spec(tmp_path, args=(sys.executable, "-c", code))
    task = await driver.launch(s)
    await await_until(lambda: s.log_path.exists() and "up" in s.log_path.read_text())
    result = await task.stop(grace_seconds=0.3)
    assert result.returncode == -signal.SIGKILL


async def test_memory_limit_kills_and_reports_oom(driver: ProcessDriver, tmp_path: Path) -> None:
    if not driver.limiter.kind.startswith("cgroup"):
        pytest.skip(f"no writable cgroup memory controller here ({driver.limiter!r})")
    code = "x = bytearray(300 * 1024 * 1024); print('survived')"
    task = await driver.launch(spec(tmp_path, args=(sys.executable, "-c", code), mem=64.0))
    result = await task.wait()
    assert result.oom and not result.succeeded
    assert "Memory limit" in result.message


async def test_cgroup_limits_match_the_app(driver: ProcessDriver, tmp_path: Path) -> None:
    if not driver.limiter.kind.startswith("cgroup"):
        pytest.skip(f"no writable cgroup controllers here ({driver.limiter!r})")
    task = await driver.launch(spec(tmp_path, cmd="sleep 300", cpus=0.5, mem=96.0))
    try:
        limits = driver.limiter.in_force("t.1")
        assert limits == {"memory": 96 * 1024 * 1024, "cpu_quota": 50_000}
        assert task.pid in driver.limiter.pids("t.1")
    finally:
        await task.stop(grace_seconds=5)
    assert driver.limiter.pids("t.1") == []
    if driver.limiter.kind == "cgroup-v1":
        # Inside the host's cgroup nothing of berth outlives its last task.
        assert not any(d.exists() for d in driver.limiter.parent_dirs)


async def test_rlimit_fallback_limits_address_space(tmp_path: Path) -> None:
    d = ProcessDriver(tmp_path / "sb", Limiter("rlimit"), 1 << 20, 2)
    code = "x = bytearray(300 * 1024 * 1024)"
    try:
        task = await d.launch(spec(tmp_path, args=(sys.executable, "-c", code), mem=128.0))
        assert task.limits_in_force == "rlimit"
        result = await task.wait()
        assert result.returncode == 1 and result.oom  # MemoryError
        assert "RLIMIT_AS" in result.message
    finally:
        d.close()


def test_reap_orphans_kills_processes_of_stale_tasks(driver: ProcessDriver, tmp_path: Path) -> None:
    env = {**os.environ, "MESOS_TASK_ID": "stale.1"}
    orphan = subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        assert driver.reap_orphans({"stale.1": (None, None)}) == 1
        assert orphan.wait(10) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (orphan, bystander):
            p.kill()
            p.wait()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from berth.scheduler.driver.base import LaunchSpec
    from berth.scheduler.driver.limits import Limiter
    from berth.scheduler.driver.process import ProcessDriver

    async def main():
        tmp = Path(sys.argv[1])
        d = ProcessDriver(tmp / "sb", Limiter("auto"), 1 << 20, 2)
        t = await d.launch(LaunchSpec("o.1", "/o", "sleep 300", None,
                                      {"MESOS_TASK_ID": "o.1"}, 0.1, 64.0, tmp / "o.log"))
        print(t.pid, flush=True)
        await asyncio.sleep(300)

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_tasks_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as sup:
        try:
            assert sup.stdout is not None
            pid = int(sup.stdout.readline())
            task = psutil.Process(pid)
            sup.send_signal(signal.SIGKILL)
            sup.wait()
            # PR_SET_PDEATHSIG: the kernel kills the task when its supervisor dies.
            task.wait(timeout=10)
            # ... and the reaper sidecar kills what the shell forked (PDEATHSIG misses it).
            assert wait_gone("o.1")
            # What a recovering scheduler does with the dead one's leftovers.
            limiter = Limiter("auto")
            limiter.release("o.1")
            limiter.close()
        finally:
            if sup.poll() is None:
                sup.kill()
                sup.wait()


def test_container_image_is_unsupported(driver: ProcessDriver) -> None:
    app = parse_app({"id": "/d", "container": {"type": "DOCKER", "docker": {"image": "nginx"}}})
    with pytest.raises(UnsupportedApp) as err:
        driver.check(app)
    assert err.value.path == "/container/docker/image"


def test_marathon_env() -> None:
    app = parse_app(
        {
            "id": "/grp/web",
            "cmd": "x",
            "env": {"FOO": "bar", "PORT": "1"},
            "labels": {"BERTH_VHOST": "a.example", "team-x": "y"},
            "portDefinitions": [{"port": 0, "name": "http"}, {"port": 0}],
            "cpus": 0.25,
            "mem": 64,
        }
    )
    env = marathon_env(app, TaskEnv("127.0.0.1", [10001, 10002], "grp_web.abc"))
    assert env["FOO"] == "bar"
    assert env["PORT"] == "1"  # the app's own PORT wins, as in Marathon
    assert (env["PORT0"], env["PORT1"], env["PORTS"]) == ("10001", "10002", "10001,10002")
    assert env["PORT_HTTP"] == "10001"
    assert env["HOST"] == "127.0.0.1"
    assert env["MARATHON_APP_ID"] == "/grp/web"
    assert env["MARATHON_APP_VERSION"] == app.version
    assert env["MESOS_TASK_ID"] == "grp_web.abc"
    assert env["MARATHON_APP_RESOURCE_CPUS"] == "0.25"
    assert env["MARATHON_APP_RESOURCE_MEM"] == "64.0"
    assert env["MARATHON_APP_LABELS"] == "BERTH_VHOST TEAM_X"
    assert env["MARATHON_APP_LABEL_TEAM_X"] == "y"


def test_task_log_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = TaskLog(path, max_size=300, max_files=3)
    for i in range(40):
        log.write(f"line {i}\n", "stdout")
    log.close()
    rotated = sorted(p.name for p in tmp_path.iterdir())
    assert rotated == ["t.log", "t.log.1", "t.log.2"]
    assert all(p.stat().st_size <= 300 for p in tmp_path.iterdir())
    assert records(path)[-1]["log"] == "line 39\n"


def _free_block(size: int) -> int:
    """A run of free ports below the kernel's ephemeral range (32768+), where
    port-0 binds of concurrent tests never land, and above the scheduler's
    default task range (10000-20000)."""
    for base in range(25000, 32000, size):
        socks = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free block of ports")


def test_ports_never_collide_and_skip_busy_ones() -> None:
    port = _free_block(4)
    busy = socket.socket()
    busy.bind(("127.0.0.1", port))
    busy.listen()
    try:
        alloc = PortAllocator("127.0.0.1", port, port + 3)
        got = alloc.allocate(3)
        assert port not in got and len(set(got)) == 3
        with pytest.raises(NoPortsLeft):
            alloc.allocate(1)
        with pytest.raises(NoPortsLeft, match=str(port)):
            alloc.allocate(1, [port])
        alloc.release(got[:1])
        assert alloc.allocate(1) == got[:1]
    finally:
        busy.close()


def test_prune_keeps_live_and_most_recent_ended_task_logs(tmp_path: Path) -> None:
    names = ["a.1.log", "a.1.log.1", "a.2.log", "a.3.log", "my.logger.9.log", "live.log"]
    for i, name in enumerate(names):
        path = tmp_path / name
        path.write_text("x")
        os.utime(path, (1000 + i, 1000 + i))
    removed = prune(tmp_path, keep=1, live={"live"})
    assert sorted(p.name for p in removed) == ["a.1.log", "a.1.log.1", "a.2.log", "a.3.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.log", "my.logger.9.log"]
