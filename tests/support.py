"""Helpers for tests that run real berth processes on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

LISTENING = re.compile(r"listening on (https?://[\w.\[\]:]+)")


class BerthProcess:
    """A running ``berth`` subcommand; its stderr is kept for assertions and failures.

    Ready when a line matches ``ready_line``; its first group becomes ``url``.
    """

    ready_line: re.Pattern[str] = LISTENING

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "berth.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            text=True,
            start_new_session=True,
        )
        self.lines: deque[str] = deque(maxlen=2000)
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"<BerthProcess {self.args[:1]} pid={self.proc.pid} url={self.url}>"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._on_line(line)
            if self.url is None and (m := self.ready_line.search(line)):
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def _on_line(self, line: str) -> None:
        """Runs on the reader thread for every line; subclasses pick out more."""

    def wait_ready(self, timeout: float = 30) -> str:
        if not self._ready.wait(timeout) or self.url is None:
            self.stop()
            raise RuntimeError(f"{self!r} did not start:\n" + "\n".join(self.lines))
        return self.url

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15, sig: int | None = None) -> int:
        # None = SIGTERM (the module is shadowed here by the signal() method).
        self.signal(signal.SIGTERM if sig is None else sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            code = self.proc.wait()
        self._close()
        return code

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        # Close the pipe once the reader has drained it: an unclosed pipe is a
        # ResourceWarning, which the suite turns into an error.
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


@contextmanager
def berth(*args: str, env: dict[str, str] | None = None) -> Iterator[BerthProcess]:
    """Run ``berth ARGS`` until the block ends; always stopped, whatever happens."""
    proc = BerthProcess(args, env)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def control_plane(data_dir: Path, *extra: str) -> BerthProcess:
    return BerthProcess(["server", "--port", "0", "--data-dir", str(data_dir), *extra])
