"""Process-driver failure modes found in review, with real processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from berth.scheduler.driver.base import LaunchSpec
from berth.scheduler.driver.limits import Limiter
from berth.scheduler.driver.process import ProcessDriver
from tests.scheduler.core_support import tagged, wait_gone

CHATTY = "import sys\nfor _ in range(2000):\n    sys.stdout.write('x' * 500 + '\\n')\n"


async def test_a_failing_log_file_never_blocks_the_task(tmp_path: Path) -> None:
    # 1 KiB logs rotate at once; a directory where the rotated file must go makes the
    # rotation fail (as a full disk would). The task must still be drained and finish,
    # not block forever on a full stdout pipe nobody reads.
    driver = ProcessDriver(tmp_path / "sandboxes", Limiter("none"), 1024, 3)
    log_path = tmp_path / "logs" / "t.1.log"
    (tmp_path / "logs" / "t.1.log.1" / "in-the-way").mkdir(parents=True)
    spec = LaunchSpec("t.1", "/t", None, (sys.executable, "-c", CHATTY), {}, 0.5, 256.0, log_path)
    try:
        task = await driver.launch(spec)
        async with asyncio.timeout(30):
            result = await task.wait()
        assert result.returncode == 0
    finally:
        driver.close()


SUPERVISOR = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from berth.scheduler.driver.base import LaunchSpec
    from berth.scheduler.driver.limits import Limiter
    from berth.scheduler.driver.process import ProcessDriver

    def spec(task_id, tmp):
        return LaunchSpec(task_id, "/r", "sleep 300; true", None,
                          {"MESOS_TASK_ID": task_id}, 0.1, 64.0, tmp / f"{task_id}.log")

    async def main():
        tmp = Path(sys.argv[1])
        d = ProcessDriver(tmp / "sb", Limiter("auto"), 1 << 20, 2)
        await d.launch(spec("r.1", tmp))
        # The sidecar dies (OOM killer, an operator's kill -9) while r.1 runs.
        os.kill(d.reaper._proc.pid, signal.SIGKILL)
        d.reaper._proc.wait()
        await d.launch(spec("r.2", tmp))
        print("ready", flush=True)
        await asyncio.sleep(300)

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_a_respawned_reaper_still_covers_earlier_tasks(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as sup:
        try:
            assert sup.stdout is not None
            assert sup.stdout.readline().strip() == "ready"
            assert tagged("r.1") and tagged("r.2")
            sup.send_signal(signal.SIGKILL)
            sup.wait()
            # What the shells forked is beyond PDEATHSIG: only the sidecar can kill it.
            assert wait_gone("r.2")
            assert wait_gone("r.1")
        finally:
            if sup.poll() is None:
                sup.kill()
                sup.wait()
            for task_id in ("r.1", "r.2"):
                for proc in tagged(task_id):
                    proc.kill()
            limiter = Limiter("auto")
            for task_id in ("r.1", "r.2"):
                limiter.release(task_id)
            limiter.close()


CHECKER = textwrap.dedent(
    """
    import asyncio, sys
    from berth.scheduler.driver.process import Reaper
    from berth.scheduler.health import Probes
    from berth.scheduler.models import HealthCheck

    async def main():
        probes = Probes(Reaper())  # what the scheduler passes: its driver's reaper
        check = HealthCheck(protocol="COMMAND", command="sleep 300", timeout_seconds=300)
        env = {"MESOS_TASK_ID": "h.1"}
        probe = asyncio.ensure_future(probes.run(check, "127.0.0.1", None, env))
        await asyncio.sleep(0.5)
        print("ready", flush=True)
        await probe

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_a_command_health_check_dies_with_a_killed_control_plane(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHECKER], stdout=subprocess.PIPE, text=True
    ) as sup:
        try:
            assert sup.stdout is not None
            assert sup.stdout.readline().strip() == "ready"
            assert tagged("h.1")
            sup.send_signal(signal.SIGKILL)
            sup.wait()
            assert wait_gone("h.1")
        finally:
            if sup.poll() is None:
                sup.kill()
                sup.wait()
            for proc in tagged("h.1"):
                proc.kill()


async def test_a_descendant_that_left_the_group_dies_with_the_task_under_rlimits(
    tmp_path: Path,
) -> None:
    # Without cgroups nothing but the inherited MESOS_TASK_ID ties a setsid'd
    # descendant to its task; it must not outlive the task's end unsupervised.
    driver = ProcessDriver(tmp_path / "sandboxes", Limiter("rlimit"), 1 << 20, 2)
    env = {"MESOS_TASK_ID": "s.1"}
    spec = LaunchSpec(
        "s.1", "/s", "setsid sleep 300 & sleep 0.3", None, env, 0.5, 256.0, tmp_path / "s.1.log"
    )
    try:
        task = await driver.launch(spec)
        await task.wait()
        assert await asyncio.to_thread(wait_gone, "s.1")
    finally:
        driver.close()
        for proc in tagged("s.1"):
            proc.kill()


async def test_the_task_ends_when_its_leader_does_though_a_child_holds_stdout(
    tmp_path: Path,
) -> None:
    # asyncio's Process.wait() also waits for the pipes to close: a background child
    # holding stdout kept a dead task "running" (never replaced, never cleaned up).
    driver = ProcessDriver(tmp_path / "sandboxes", Limiter("auto"), 1 << 20, 2)
    env = {"MESOS_TASK_ID": "b.1"}
    spec = LaunchSpec(
        "b.1",
        "/b",
        "sleep 300 & echo started; sleep 0.5; exit 3",
        None,
        env,
        0.5,
        256.0,
        tmp_path / "b.1.log",
    )
    try:
        task = await driver.launch(spec)
        async with asyncio.timeout(30):
            result = await task.wait()
        assert result.returncode == 3
        assert await asyncio.to_thread(wait_gone, "b.1")
        assert "started" in spec.log_path.read_text()
    finally:
        driver.close()
        for proc in tagged("b.1"):
            proc.kill()
