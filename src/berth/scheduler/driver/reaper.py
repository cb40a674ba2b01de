"""Dead man's switch for task processes: ``python reaper.py`` beside each control plane.

PR_SET_PDEATHSIG only reaches a task's *leader*; ``/bin/sh -c cmd`` (dash)
forks the real program, so a control plane killed with SIGKILL would leave it
running. This process is the fix: the driver writes ``add <task> <pgid>
[cgroup.procs...]`` / ``del <task>`` lines to its stdin, and when stdin hits
EOF (the kernel closes the pipe however the control plane died) it SIGKILLs
every listed process group, every pid left in the tasks' cgroups and, by a
process-table scan, every process carrying one of their ``MESOS_TASK_ID`` (a
descendant that called setsid). It runs in its own session and ignores
SIGINT/SIGTERM, so a Ctrl-C aimed at the terminal cannot take it down first.

Run by file path, not ``-m``: it must start fast and import nothing of berth.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys


def kill_all(tasks: dict[str, tuple[int, list[str]]]) -> int:
    killed = 0
    for pgid, procs in tasks.values():
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
            killed += 1
        for path in procs:
            try:
                with open(path) as fh:
                    pids = [int(p) for p in fh.read().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    if not tasks:
        return killed
    import psutil

    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get("MESOS_TASK_ID") in tasks:
                proc.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    tasks: dict[str, tuple[int, list[str]]] = {}
    for raw in sys.stdin.buffer:
        parts = raw.decode("utf-8", "replace").split()
        if len(parts) >= 3 and parts[0] == "add":
            tasks[parts[1]] = (int(parts[2]), parts[3:])
        elif len(parts) == 2 and parts[0] == "del":
            tasks.pop(parts[1], None)
    kill_all(tasks)


if __name__ == "__main__":
    main()
