"""Store benchmark: KV PUT/s and GET/s with 64 concurrent clients, and 1,000 blocking
watchers woken by one write.

Anchor: real Consul's published figures (bench/results-0.7.1.md: 3 servers,
8-core DigitalOcean droplets with SSDs, 64 concurrent clients): 3,780 PUT/s and
7,525 GET/s. The issue's bars: PUT >= 5,000/s, GET >= 20,000/s, all 1,000
watchers back within 100 ms of a write. Ratios > 1 beat Consul.

    .venv/bin/python bench/store.py [--duration 10] [--watchers 1000] [--rounds 5]

Runs a real ``berth server`` (uvloop + httptools, SQLite WAL, synchronous=NORMAL)
on 127.0.0.1 with port 0 and a temporary data dir. Load comes from ``wrk``
(installed with apt-get when missing) with Lua scripts; the watchers are raw
asyncio sockets. Server and load generator share this machine's cores, so the
server gets less than all of them: the figures are what one process does here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

CONSUL_PUT = 3780.0
CONSUL_GET = 7525.0
BAR_PUT = 5000.0
BAR_GET = 20000.0
BAR_WAKE_MS = 100.0
LISTENING = re.compile(r"listening on (http://[\d.:]+)")

REPORT_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT {\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,"
    .. "\\"errors\\":%d,\\"non2xx\\":%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""

PUT_LUA = (
    """
local counter = 0
local body = string.rep("v", 64)
request = function()
  counter = counter + 1
  return wrk.format("PUT", "/v1/kv/bench/put/" .. (counter % 10000), nil, body)
end
"""
    + REPORT_LUA
)

GET_LUA = (
    """
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/kv/bench/get/" .. (counter % 1000))
end
"""
    + REPORT_LUA
)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    print("wrk not found; installing it with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is required (Debian package wrk)")
    return found


class Server:
    def __init__(self, data_dir: Path) -> None:
        args = ["server", "--port", "0", "--data-dir", str(data_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "berth.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.url = ""
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not self.url and (m := LISTENING.search(line)):
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    def wait(self) -> str:
        self._ready.wait(60)
        return self.url

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_server(data_dir: Path) -> Server:
    server = Server(data_dir)
    server.wait()
    if not server.url:
        server.stop()
        raise SystemExit("berth server did not report its URL")
    return server


def run_wrk(wrk: str, url: str, script: str, duration: int, threads: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
        path = fh.name
    try:
        out = subprocess.run(
            [wrk, f"-t{threads}", "-c64", f"-d{duration}s", "-s", path, url],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=True,
        ).stdout
    finally:
        Path(path).unlink()
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result: dict[str, Any] = json.loads(line[len("RESULT ") :])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    index = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"x-consul-index":
            index = int(value)
    await reader.readexactly(length)
    return index


async def _timed(reader: asyncio.StreamReader, returned: list[float]) -> int:
    new_index = await read_response(reader)
    returned.append(time.perf_counter())
    return new_index


async def watchers_bench(url: str, count: int, rounds: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        await http.put("/v1/kv/watch/seed", content=b"0")
        index = int(
            (await http.get("/v1/kv/watch/", params={"recurse": ""})).headers["X-Consul-Index"]
        )
        conns = [await asyncio.open_connection(host, int(port)) for _ in range(count)]
        per_watcher: list[float] = []
        all_back: list[float] = []
        for round_ in range(rounds):
            request = (
                f"GET /v1/kv/watch/?recurse&index={index}&wait=60s HTTP/1.1\r\nHost: {host}\r\n\r\n"
            ).encode()
            for _, writer in conns:
                writer.write(request)
            await asyncio.gather(*(w.drain() for _, w in conns))
            # Wait until the store holds every watcher (no event to await from outside).
            await asyncio.sleep(1.0)
            returned: list[float] = []
            waiting = [asyncio.create_task(_timed(r, returned)) for r, _ in conns]
            start = time.perf_counter()
            await http.put(f"/v1/kv/watch/key{round_}", content=b"x")
            indexes = await asyncio.wait_for(asyncio.gather(*waiting), 60)
            per_watcher += [(t - start) * 1000 for t in returned]
            all_back.append((max(returned) - start) * 1000)
            index = max(indexes)
        for _, writer in conns:
            writer.close()
    per_watcher.sort()
    return {
        "watchers": count,
        "rounds": rounds,
        "p50_ms": statistics.median(per_watcher),
        "p99_ms": per_watcher[int(len(per_watcher) * 0.99) - 1],
        "max_ms": per_watcher[-1],
        "all_back_ms": all_back,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    wrk = ensure_wrk()
    with tempfile.TemporaryDirectory(prefix="berth-bench-") as tmp:
        server = start_server(Path(tmp))
        try:
            url = server.url
            with httpx.Client(base_url=url) as http:
                for i in range(1000):
                    http.put(f"/v1/kv/bench/get/{i}", content=b"v" * 64)
            put = run_wrk(wrk, url, PUT_LUA, args.duration, args.threads)
            get = run_wrk(wrk, url, GET_LUA, args.duration, args.threads)
            watch = asyncio.run(watchers_bench(url, args.watchers, args.rounds))
        finally:
            server.stop()

    print(f"berth store benchmark: {os.cpu_count()} cores shared by server and load generator")
    print(f"wrk -t{args.threads} -c64 -d{args.duration}s, 64-byte values, SQLite WAL NORMAL")
    print()
    header = f"{'':<10}{'berth/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
    header += f"{'Consul/s':>10}{'ratio':>8}{'bar/s':>9}{'met':>5}"
    print(header)
    for name, res, consul, bar in (
        ("KV PUT", put, CONSUL_PUT, BAR_PUT),
        ("KV GET", get, CONSUL_GET, BAR_GET),
    ):
        errors = res["errors"] + res["non2xx"]
        p50, p99 = res["p50_us"] / 1000, res["p99_us"] / 1000
        print(
            f"{name:<10}{res['rps']:>10,.0f}{p50:>9.2f}{p99:>9.2f}"
            f"{errors:>8}{consul:>10,.0f}{res['rps'] / consul:>8.2f}{bar:>9,.0f}"
            f"{'yes' if res['rps'] >= bar else 'no':>5}"
        )
    print()
    backs = ", ".join(f"{ms:.1f}" for ms in watch["all_back_ms"])
    print(
        f"{watch['watchers']} blocking watchers on one prefix, {watch['rounds']} writes:"
        f" per watcher p50 {watch['p50_ms']:.1f} ms, p99 {watch['p99_ms']:.1f} ms,"
        f" max {watch['max_ms']:.1f} ms"
    )
    worst = max(watch["all_back_ms"])
    print(
        f"all {watch['watchers']} back after each write (ms): {backs}"
        f"  (bar {BAR_WAKE_MS:.0f} ms: {'met' if worst <= BAR_WAKE_MS else 'not met'})"
    )


if __name__ == "__main__":
    main()
