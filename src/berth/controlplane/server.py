"""Run the control plane under uvicorn (uvloop + httptools)."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from berth.controlplane.app import ControlPlaneApp
from berth.controlplane.components import build_components
from berth.controlplane.config import ControlPlaneConfig
from berth.listen import bind

log = logging.getLogger("berth.controlplane")


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
