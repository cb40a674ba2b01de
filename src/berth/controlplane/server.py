"""Run the control plane under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import asyncio
import logging
import socket

import uvicorn

from berth.controlplane.app import ControlPlaneApp
from berth.controlplane.components import build_components
from berth.controlplane.config import ControlPlaneConfig

log = logging.getLogger("berth.controlplane")


class PortInUseError(OSError):
    pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only
    # when proto says TCP; without it every keep-alive response waits ~40 ms
    # for a delayed ACK (uvloop sets it regardless).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ControlPlaneServer:
    """The control plane bound to a socket; ``port`` is known before serving starts."""

    def __init__(self, config: ControlPlaneConfig) -> None:
        self.config = config
        self._sock = bind(config.host, config.port)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{config.host}:{self.port}"
        self.app = ControlPlaneApp(build_components(config, self.url), token=config.token)
        self._server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                lifespan="on",
                http="httptools",
                loop="none",
                access_log=False,
                log_config=None,
                timeout_graceful_shutdown=5,
                # Blocking queries hold a request open for up to 10 minutes.
                timeout_keep_alive=65,
            )
        )

    def __repr__(self) -> str:
        return f"<ControlPlaneServer {self.url} started={self._server.started}>"

    async def serve(self) -> None:
        await self._server.serve(sockets=[self._sock])

    async def start(self) -> None:
        """Serve in the background; returns once the app accepts requests."""
        self._task = asyncio.create_task(self.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("control plane stopped during start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.request_exit()
        await self._task

    async def wait_stopped(self) -> None:
        await self._task

    def request_exit(self) -> None:
        # Components holding requests open (the store's blocking queries, up to
        # 10 minutes) answer them now, so uvicorn's drain does not wait out its
        # graceful timeout and cancel them.
        for component in self.app.components:
            component.drain()
        self._server.should_exit = True
