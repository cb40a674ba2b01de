"""Gateway benchmark: berth's proxy against nginx and a plain aiohttp reverse proxy.

    .venv/bin/python bench/gateway.py [--rounds 3] [--duration 6] [--connections 50]

All three proxies run one worker on 127.0.0.1 in front of the same upstream
(nginx serving a static 13-byte response, one worker), with upstream
keep-alive and an access log each. Load comes from ``wrk`` (one thread):
small GET requests/s and p99 latency, then 1 MiB PUT bodies (throughput in
MiB/s). nginx and wrk are installed with apt-get when missing, aiohttp with
pip into this venv (for the comparison only; it is not a berth dependency).

Small GETs also go through a fourth process, the floor: uvloop and httptools
relaying requests and nothing else (see FLOOR_PROXY). It is what the event
loop and the parser cost before any feature, so "berth vs floor" shows what
berth's features cost, and "floor vs nginx" what any proxy on this Python
stack can reach. CPU us/req is each proxy's own CPU time (user + system, its
workers included) per request: on a shared machine, steadier than req/s.

The runs are repeated in rounds, each round every proxy once, in an order
that turns by one each round, so a noisy spell on the shared machine hits
every proxy alike. Each figure is the median over the rounds, and the
ratios of berth to nginx are also printed per round, to show their spread.

The issue's bars: small GET >= 0.75 x nginx req/s with p99 <= 2 x nginx's;
1 MiB PUT >= 0.9 x nginx's throughput; and >= 5 x aiohttp. Everything shares
this machine's cores (2 here, with the load generator and the upstream), so
the figures are relative, not what any of them does on a dedicated host.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from berth.gateway.compiled import is_compiled
from berth.scheduler.usage import tree_usage

LISTENING = re.compile(r"listening on (http://[\d.:]+)")
REPORT_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT {\\"requests\\":%d,\\"duration_us\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d,"
    .. "\\"errors\\":%d,\\"non2xx\\":%d,\\"bytes\\":%d}\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status, summary.bytes))
end
"""
PUT_LUA = (
    """
wrk.method = "PUT"
wrk.body = string.rep("b", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
"""
    + REPORT_LUA
)

UPSTREAM_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/upstream-error.log warn;
pid {dir}/upstream.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/ubody;
    proxy_temp_path {dir}/uproxy;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        client_max_body_size 2m;
        client_body_buffer_size 2m;
        location / {{ return 200 "hello, world\\n"; }}
        # PUT bodies are read whole before the answer (a `return` would answer
        # first and leave the proxy mid-body): WebDAV writes them to a file.
        location /put {{
            root {dir}/dav;
            dav_methods PUT;
            client_body_temp_path {dir}/davtmp;
        }}
    }}
}}
"""

PROXY_CONF = """
worker_processes 1;
daemon off;
error_log {dir}/proxy-error.log warn;
pid {dir}/proxy.pid;
events {{ worker_connections 4096; }}
http {{
    log_format json escape=json '{{"time":"$time_iso8601","request_id":"$request_id",'
        '"client_ip":"$remote_addr","host":"$host","method":"$request_method",'
        '"path":"$request_uri","status":$status,"upstream_addr":"$upstream_addr",'
        '"upstream_status":"$upstream_status","request_bytes":$request_length,'
        '"response_bytes":$bytes_sent,"request_time":$request_time,'
        '"upstream_time":"$upstream_response_time","user_agent":"$http_user_agent"}}';
    access_log {dir}/nginx-access.log json buffer=64k flush=1s;
    client_body_temp_path {dir}/pbody;
    proxy_temp_path {dir}/pproxy;
    keepalive_requests 1000000;
    upstream svc {{ server 127.0.0.1:{upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        client_max_body_size 1024m;
        # Stream request bodies like berth does (nginx buffers them by default).
        proxy_request_buffering off;
        location / {{
            proxy_pass http://svc;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Request-Id $request_id;
            proxy_next_upstream error timeout http_502;
        }}
    }}
}}
"""

AIOHTTP_PROXY = """
import sys
import aiohttp
from aiohttp import web

UPSTREAM = sys.argv[2]
HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "te", "trailer"}

async def proxy(request):
    session = request.app["session"]
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP | {"host"}}
    headers["Host"] = request.headers.get("Host", "")
    data = request.content if request.can_read_body else None
    async with session.request(request.method, UPSTREAM + request.path_qs, headers=headers,
                               data=data) as up:
        resp = web.StreamResponse(status=up.status)
        for k, v in up.headers.items():
            if k.lower() not in HOP | {"content-length"}:
                resp.headers[k] = v
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

async def start(app):
    app["session"] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=60))

async def stop(app):
    await app["session"].close()

app = web.Application(client_max_size=1 << 31)
app.router.add_route("*", "/{tail:.*}", proxy)
app.on_startup.append(start)
app.on_cleanup.append(stop)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""

# The floor for any Python proxy on this stack: uvloop + httptools relaying
# keep-alive GETs with nothing else (no routing, logging, limits, timeouts,
# retries, header rewriting beyond dropping Connection, or error handling).
# Not a usable proxy: it only shows how close to it berth's features cost.
FLOOR_PROXY = """
import asyncio, sys, httptools, uvloop
UP = ("127.0.0.1", int(sys.argv[2]))
idle = []

class Up(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.client = None
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_message_begin(self):
        self.headers = []
    def on_header(self, name, value):
        self.headers.append((name, value))
    def on_headers_complete(self):
        out = [b"HTTP/1.1 %d OK\\r\\n" % self.parser.get_status_code()]
        for name, value in self.headers:
            if name.lower() != b"connection":
                out += (name, b": ", value, b"\\r\\n")
        out.append(b"\\r\\n")
        self.out = out
    def on_body(self, body):
        self.out.append(body)
    def on_message_complete(self):
        client, self.client = self.client, None
        idle.append(self)
        if not client.transport.is_closing():
            client.transport.writelines(self.out)

class Client(asyncio.Protocol):
    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.parser.feed_data(data)
    def on_message_begin(self):
        self.url = b""
        self.headers = []
    def on_url(self, url):
        self.url += url
    def on_header(self, name, value):
        self.headers.append((name, value))
    def on_message_complete(self):
        out = [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\\r\\n"]
        for name, value in self.headers:
            out += (name, b": ", value, b"\\r\\n")
        out.append(b"X-Forwarded-For: 127.0.0.1\\r\\n\\r\\n")
        head = b"".join(out)
        if idle:
            up = idle.pop()
            up.client = self
            up.transport.write(head)
        else:
            asyncio.get_running_loop().create_task(self.connect(head))
    async def connect(self, head):
        _, up = await asyncio.get_running_loop().create_connection(Up, *UP)
        up.client = self
        up.transport.write(head)

async def main():
    server = await asyncio.get_running_loop().create_server(Client, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()

uvloop.run(main())
"""


def ensure_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk") if not shutil.which(tool)]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        # The comparison's proxy only: not a berth dependency.
        print("installing aiohttp into this venv for the comparison ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aiohttp>=3.9"], check=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_berth(
    args: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "berth.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if m := LISTENING.search(line):
            # Keep draining its output so it never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError(f"berth {args[0]} did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (nginx's worker), as the
    scheduler measures its tasks."""
    usage = tree_usage(pid)
    assert usage is not None, f"process {pid} is gone"
    return usage[1]


def turned(items: list[tuple[str, str]], by: int) -> list[tuple[str, str]]:
    """``items`` rotated left ``by`` places: each round starts with another proxy."""
    by %= len(items)
    return items[by:] + items[:by]


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the rounds; errors are added up."""
    out = {
        key: statistics.median(run[key] for run in runs)
        for key, value in runs[0].items()
        if isinstance(value, int | float)
    }
    out["failed"] = sum(run["errors"] + run["non2xx"] for run in runs)
    return out


def wrk(url: str, duration: int, connections: int, script: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency",
            "-H", "Host: svc", "-s", str(script), url,
        ],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            doc: dict[str, Any] = json.loads(line[len("RESULT ") :])
            secs = doc["duration_us"] / 1e6
            doc["rps"] = doc["requests"] / secs
            return doc
    raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=6, help="seconds per run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--put-connections", type=int, default=8)
    opts = parser.parse_args()
    ensure_tools()

    work = Path(tempfile.mkdtemp(prefix="berth-bench-gw-"))
    # nginx workers run as another user when nginx is started by root.
    work.chmod(0o755)
    (work / "dav").mkdir()
    (work / "dav").chmod(0o777)
    get_lua, put_lua = work / "get.lua", work / "put.lua"
    get_lua.write_text(REPORT_LUA)
    put_lua.write_text(PUT_LUA)
    procs: list[subprocess.Popen[Any]] = []
    try:
        up_port, ngx_port, aio_port, floor_port = (free_port() for _ in range(4))
        (work / "upstream.conf").write_text(UPSTREAM_CONF.format(dir=work, port=up_port))
        (work / "proxy.conf").write_text(
            PROXY_CONF.format(dir=work, port=ngx_port, upstream=up_port)
        )
        for conf in ("upstream.conf", "proxy.conf"):
            procs.append(subprocess.Popen(["nginx", "-p", str(work), "-c", str(work / conf)]))
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", AIOHTTP_PROXY, str(aio_port), upstream],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        procs.append(
            subprocess.Popen([sys.executable, "-c", FLOOR_PROXY, str(floor_port), str(up_port)])
        )
        cp, cp_url = start_berth(["server", "--port", "0", "--data-dir", str(work / "cp")])
        procs.append(cp)
        with httpx.Client(base_url=cp_url) as store:
            store.put(
                "/v1/kv/berth/gateway/upstreams/svc",
                json={"servers": [{"host": "127.0.0.1", "port": up_port}]},
            ).raise_for_status()
        gw, gw_url = start_berth(
            [
                "gateway", "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
                "--store-url", cp_url, "--data-dir", str(work / "gw"), "--workers", "1",
            ],
        )  # fmt: skip
        procs.append(gw)
        for port in (up_port, ngx_port, aio_port, floor_port):
            wait_port(port)
        targets = {
            "nginx": f"http://127.0.0.1:{ngx_port}/",
            "berth": gw_url + "/",
            "aiohttp": f"http://127.0.0.1:{aio_port}/",
        }
        for name, url in targets.items():
            r = httpx.get(url, headers={"Host": "svc"})
            assert r.status_code == 200 and r.text == "hello, world\n", (name, r.status_code)
            r = httpx.put(url + "put", headers={"Host": "svc"}, content=b"b" * (1 << 20))
            assert r.status_code in (201, 204), (name, r.status_code, r.text)
            wrk(url, 2, opts.connections, get_lua)  # warm-up: connection pools, page cache
        floor_url = f"http://127.0.0.1:{floor_port}/"
        assert httpx.get(floor_url, headers={"Host": "svc"}).text == "hello, world\n"
        wrk(floor_url, 2, opts.connections, get_lua)
        pids = {"nginx": procs[1].pid, "berth": gw.pid, "aiohttp": procs[2].pid,
                "floor": procs[3].pid}  # fmt: skip

        build = "compiled with mypyc" if is_compiled() else "interpreted (no compiled build)"
        print(
            f"\ngateway benchmark: wrk -t1, {opts.rounds} rounds of {opts.duration}s per run, "
            f"{os.cpu_count()} cores shared by all processes; berth's data plane {build}\n"
        )
        get_urls = [*targets.items(), ("floor", floor_url)]
        get_runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in get_urls}
        put_runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for round_no in range(opts.rounds):
            for name, url in turned(get_urls, round_no):
                before = cpu_seconds(pids[name])
                run = wrk(url, opts.duration, opts.connections, get_lua)
                run["cpu_us"] = (cpu_seconds(pids[name]) - before) / run["requests"] * 1e6
                get_runs[name].append(run)
            for name, url in turned(list(targets.items()), round_no):
                run = wrk(url + "put", opts.duration, opts.put_connections, put_lua)
                run["mib_s"] = run["rps"]  # 1 MiB per request
                put_runs[name].append(run)
        get = {name: summary(runs) for name, runs in get_runs.items()}
        put = {name: summary(runs) for name, runs in put_runs.items()}

        print(f"small GET, {opts.connections} connections")
        print(
            f"  {'proxy':<8} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} "
            f"{'CPU us/req':>11}"
        )
        for name, fig in get.items():
            print(
                f"  {name:<8} {fig['rps']:>10.0f} {fig['p50_us'] / 1000:>8.2f} "
                f"{fig['p99_us'] / 1000:>8.2f} {fig['failed']:>7} {fig['cpu_us']:>11.1f}"
            )
        print(
            "  (floor: uvloop + httptools relaying GETs and nothing else, not a usable\n"
            "   proxy: the most any Python proxy on this stack can do here)"
        )
        print(f"\n1 MiB PUT, {opts.put_connections} connections")
        print(f"  {'proxy':<8} {'MiB/s':>10} {'p99 ms':>8} {'errors':>7}")
        for name, fig in put.items():
            print(
                f"  {name:<8} {fig['mib_s']:>10.1f} {fig['p99_us'] / 1000:>8.2f} {fig['failed']:>7}"
            )
        b, n, a = get["berth"], get["nginx"], get["aiohttp"]
        print("\nratios (berth / other; bars from the issue)")
        rows = [
            ("GET req/s vs nginx", b["rps"] / n["rps"], ">= 0.75"),
            ("GET p99 vs nginx", b["p99_us"] / max(n["p99_us"], 1), "<= 2.0"),
            ("PUT MiB/s vs nginx", put["berth"]["mib_s"] / put["nginx"]["mib_s"], ">= 0.9"),
            ("GET req/s vs aiohttp", b["rps"] / a["rps"], ">= 5"),
            ("PUT MiB/s vs aiohttp", put["berth"]["mib_s"] / put["aiohttp"]["mib_s"], ""),
            ("GET req/s vs floor", b["rps"] / get["floor"]["rps"], ""),
            ("floor GET vs nginx", get["floor"]["rps"] / n["rps"], ""),
        ]
        for label, value, bar in rows:
            print(f"  {label:<22} {value:>6.2f}  {bar}")
        print("\nper round (berth / nginx, berth / aiohttp)")
        for i in range(opts.rounds):
            bg, ng, ag = (get_runs[name][i]["rps"] for name in ("berth", "nginx", "aiohttp"))
            bp, np_ = (put_runs[name][i]["mib_s"] for name in ("berth", "nginx"))
            print(
                f"  round {i + 1}: GET {bg / ng:.2f}, PUT {bp / np_:.2f}, "
                f"GET vs aiohttp {bg / ag:.2f}"
            )
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
