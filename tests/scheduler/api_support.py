"""Helpers for the Marathon API tests that run a real ``berth server``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.support import BerthProcess, control_plane

# A 5-line HTTP server: answers 200 on every path, no access log noise.
SERVER = (
    "import http.server,os\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self): self.send_response(200); self.end_headers(); self.wfile.write(b'ok')\n"
    "    def log_message(self, *a): pass\n"
    "http.server.ThreadingHTTPServer(('127.0.0.1', int(os.environ['PORT0'])), H).serve_forever()\n"
)


def tiny_app(app_id: str, instances: int = 1, *, health: bool = True) -> dict[str, Any]:
    app: dict[str, Any] = {
        "id": app_id,
        "args": [sys.executable, "-c", SERVER],
        "instances": instances,
        "cpus": 0.1,
        "mem": 64,
        "taskKillGracePeriodSeconds": 1,
    }
    if health:
        app["healthChecks"] = [
            {
                "protocol": "HTTP",
                "path": "/",
                "portIndex": 0,
                "gracePeriodSeconds": 30,
                "intervalSeconds": 1,
                "timeoutSeconds": 2,
                "maxConsecutiveFailures": 3,
            }
        ]
    return app


def never_healthy(app_id: str) -> dict[str, Any]:
    """Runs, but its HTTP check can never pass: its deployments stay open (locks)."""
    app = tiny_app(app_id)
    app["args"] = [sys.executable, "-c", "import time; time.sleep(600)"]
    return app


@contextlib.contextmanager
def running_server(data_dir: Path) -> Iterator[BerthProcess]:
    proc = control_plane(data_dir)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        close_output(proc)


def close_output(proc: BerthProcess) -> None:
    """Close the captured stdout once its reader has drained it (else a ResourceWarning)."""
    proc._reader.join(10)
    if proc.proc.stdout is not None and not proc._reader.is_alive():
        proc.proc.stdout.close()


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll with a deadline, for states no event announces (a port closing)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class EventStream:
    """An SSE subscription read in the background; ``wait_for`` awaits a matching event."""

    def __init__(self, url: str, event_types: list[str] | None = None) -> None:
        self.url = url
        self.params = [("event_type", t) for t in event_types or []]
        self.seen: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._client = httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(10, read=None))

    async def __aenter__(self) -> EventStream:
        attached = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read(attached))
        await asyncio.wait_for(attached, 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._reader is not None
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._client.aclose()

    async def _read(self, attached: asyncio.Future[None]) -> None:
        headers = {"Accept": "text/event-stream"}
        async with self._client.stream(
            "GET", "/v2/events", params=self.params, headers=headers
        ) as r:
            assert r.status_code == 200, r.status_code
            async for line in r.aiter_lines():
                if line.startswith(":") and not attached.done():
                    # The server's first comment: the subscription is registered.
                    attached.set_result(None)
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                self.seen.append(event)
                self._arrived.set()

    async def wait_for(
        self,
        event_type: str,
        timeout: float = 60.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """The first event (already seen or still to come) of this type with these fields."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = 0
        while True:
            while index < len(self.seen):
                event = self.seen[index]
                index += 1
                if (
                    event["eventType"] == event_type
                    and all(event.get(k) == v for k, v in fields.items())
                    and (where is None or where(event))
                ):
                    return event
            self._arrived.clear()
            if index < len(self.seen):
                continue
            remaining = deadline - loop.time()
            try:
                await asyncio.wait_for(self._arrived.wait(), max(remaining, 0.001))
            except TimeoutError:
                kinds = [e["eventType"] for e in self.seen][-30:]
                raise AssertionError(
                    f"no {event_type} {fields} within {timeout}s; saw {kinds}"
                ) from None


@contextlib.asynccontextmanager
async def api_client(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield client


def berth_cli(
    *args: str, url: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``berth`` CLI as a user would, pointed at ``url`` through BERTH_URL."""
    env = {**os.environ, "BERTH_URL": url, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "berth.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=110,
        check=False,
    )
