"""Process-driver failure modes found in review, with real processes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from berth.scheduler.driver.base import LaunchSpec
from berth.scheduler.driver.limits import Limiter
from berth.scheduler.driver.process import ProcessDriver

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
