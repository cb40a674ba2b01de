"""The HTTP shell every processing service shares.

It owns what is not about images: the worker pool and its admission limit,
/health and /metrics, turning every error into ``{"error": code, "message"}``
JSON, and serving under uvicorn with an orderly stop on SIGTERM (stop
accepting, let in-flight requests finish, then close the pool).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from berth.listen import bind
from berth.services.config import ServiceConfig
from berth.services.errors import BodyTimeout, Overloaded, ServiceError
from berth.services.http import bounded_head_protocol
from berth.services.metrics import ServiceMetrics
from berth.services.pool import Admission, WorkPool
from berth.services.upload import Upload, read_upload

log = logging.getLogger("berth.services")

T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]


def error_response(exc: ServiceError, retry_after: int | None = None) -> JSONResponse:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else None
    return JSONResponse(
        {"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
    )


class ServiceShell:
    def __init__(self, name: str, config: ServiceConfig) -> None:
        self.name = name
        self.config = config
        self.pool = WorkPool(config.workers, config.limit_queue)
        self.metrics = ServiceMetrics(name, self.pool)
        self.closing = False

    def __repr__(self) -> str:
        return f"<ServiceShell {self.name} closing={self.closing} pool={self.pool!r}>"

    def admit(self) -> Admission:
        """A place in the pool, taken before the body is read (503 if there is none)."""
        return self.pool.admit()

    async def read(self, request: Request) -> Upload:
        """The upload, within the body size and time limits (call it once admitted)."""
        timeout = self.config.timeout_body
        try:
            async with asyncio.timeout(timeout):
                return await read_upload(request, self.config.limit_body_bytes)
        except TimeoutError:
            raise BodyTimeout(f"the body did not arrive within {timeout:g} s") from None

    async def work(self, place: Admission, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a worker thread, timing only the time it actually runs."""

        def timed() -> T:
            started = time.perf_counter()
            try:
                return fn()
            finally:
                self.metrics.processing.labels(self.name).observe(time.perf_counter() - started)

        return await place.run(timed)

    def endpoint(self, handler: Endpoint) -> Endpoint:
        """Wrap a handler so every outcome is JSON on error and counted in the metrics."""

        async def wrapped(request: Request) -> Response:
            code: str | None = None
            try:
                response = await handler(request)
            except ServiceError as exc:
                code = exc.code
                retry = self.config.retry_after_seconds if isinstance(exc, Overloaded) else None
                response = error_response(exc, retry)
            except Exception:
                log.exception(
                    "%s: unexpected error on %s %s", self.name, request.method, request.url.path
                )
                code = "internal"
                response = JSONResponse(
                    {"error": "internal", "message": "internal error, see the service log"},
                    status_code=500,
                )
            self.metrics.observe(response.status_code, code)
            return response

        return wrapped

    async def _health(self, request: Request) -> Response:
        ready = not self.closing and self.pool.can_admit()
        body = {
            "status": "ok" if ready else ("closing" if self.closing else "busy"),
            "service": self.name,
            "running": self.pool.running,
            "queued": self.pool.queued,
            "workers": self.pool.workers,
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    async def _live(self, request: Request) -> Response:
        # Liveness apart from readiness: a saturated instance is not broken,
        # and restarting it would only lose the work it holds.
        return JSONResponse({"status": "alive", "service": self.name})

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        self.metrics.observe(exc.status_code, code)
        return JSONResponse(
            {"error": code, "message": f"{request.method} {request.url.path}: {exc.detail}"},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    def app(self, routes: list[BaseRoute]) -> Starlette:
        return Starlette(
            routes=[
                Route("/health", self._health, methods=["GET", "HEAD"]),
                Route("/live", self._live, methods=["GET", "HEAD"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                *routes,
            ],
            exception_handlers={HTTPException: self._http_error},
        )


class ServiceServer:
    """One service bound to a socket; ``url`` is known before serving starts."""

    def __init__(self, shell: ServiceShell, app: Starlette) -> None:
        self.shell = shell
        config = shell.config
        self._sock = bind(config.host, config.port)
        self.port: int = self._sock.getsockname()[1]
        host = f"[{config.host}]" if ":" in config.host else config.host
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(
                app,
                lifespan="off",
                http=bounded_head_protocol(config.timeout_body, shell.metrics.observe),
                loop="none",
                access_log=False,
                log_config=None,
                # In-flight images get their processing time to finish.
                timeout_graceful_shutdown=int(config.timeout_processing) + 5,
            )
        )
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<ServiceServer {self.shell.name} {self.url} started={self._server.started}>"

    async def start(self) -> None:
        """Serve in the background; returns once connections are accepted."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"{self.shell.name} stopped during start")
            await asyncio.sleep(0.01)

    def request_exit(self) -> None:
        self.shell.closing = True
        self._server.should_exit = True

    async def wait_stopped(self) -> None:
        assert self._task is not None
        try:
            await self._task
        finally:
            self.shell.pool.close()
            self._sock.close()

    async def stop(self) -> None:
        self.request_exit()
        await self.wait_stopped()
