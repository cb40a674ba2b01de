"""Task stdout/stderr in Docker's json-file format, rotated by size.

One JSON object per line: ``{"log": "<line>\\n", "stream": "stdout", "time":
"<RFC 3339, nanoseconds>"}``, so log shippers that read Docker's files (Fluent
Bit, Vector, berth's own agent) read these unchanged. Rotation follows
Docker's ``max-size``/``max-file``: ``x.log`` becomes ``x.log.1`` and so on.
Hand-written because it is 60 lines and the logging module's handlers would
add a formatter layer per line on the hottest path of a chatty task.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import IO, Literal

Stream = Literal["stdout", "stderr"]
# "<task-id>.log" or a rotated "<task-id>.log.N"; task ids may contain ".log" themselves.
_LOG_NAME = re.compile(r"^(.+)\.log(?:\.\d+)?$")


def rfc3339_nano(ts_ns: int) -> str:
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def encode(line: str, stream: Stream, ts_ns: int) -> bytes:
    doc = {"log": line, "stream": stream, "time": rfc3339_nano(ts_ns)}
    return json.dumps(doc, ensure_ascii=False).encode() + b"\n"


class TaskLog:
    def __init__(self, path: Path, max_size: int, max_files: int) -> None:
        self.path = path
        self.max_size = max_size
        self.max_files = max_files
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] | None = path.open("ab")
        self._size = self._fh.tell()

    def __repr__(self) -> str:
        return f"<TaskLog {self.path} size={self._size} closed={self._fh is None}>"

    def write(self, line: str, stream: Stream) -> None:
        if self._fh is None:
            return
        record = encode(line, stream, time.time_ns())
        if self._size and self._size + len(record) > self.max_size:
            self._rotate()
        assert self._fh is not None
        self._fh.write(record)
        self._size += len(record)

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def _rotate(self) -> None:
        assert self._fh is not None
        self._fh.close()
        if self.max_files <= 1:
            self.path.unlink(missing_ok=True)
        else:
            for n in range(self.max_files - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if n == self.max_files - 1:
                    older.unlink(missing_ok=True)
                newer = self.path if n == 1 else self.path.with_name(f"{self.path.name}.{n - 1}")
                if newer.exists():
                    newer.rename(older)
        self._fh = self.path.open("ab")
        self._size = 0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def prune(app_dir: Path, keep: int, live: set[str]) -> list[Path]:
    """Delete the logs of all but the ``keep`` most recent ended tasks of one app.

    A crash-looping app starts a new task (and file) per launch; without this its
    directory grows forever. Logs of live tasks are never touched.
    """
    ended: dict[str, list[Path]] = {}
    for path in app_dir.glob("*.log*"):
        m = _LOG_NAME.match(path.name)
        if m is None:
            continue
        task_id = m.group(1)
        if task_id not in live:
            ended.setdefault(task_id, []).append(path)
    by_age = sorted(ended, key=lambda t: max(p.stat().st_mtime for p in ended[t]), reverse=True)
    removed: list[Path] = []
    for task_id in by_age[keep:]:
        for path in ended[task_id]:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
