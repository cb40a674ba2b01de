from __future__ import annotations

from typing import Protocol

from starlette.types import Receive, Scope, Send


class Component(Protocol):
    """A part of the control plane: owns some path prefixes and background tasks."""

    prefixes: tuple[str, ...]

    async def start(self) -> None: ...

    def drain(self) -> None:
        """The process is about to stop: end requests held open (blocking
        queries, event streams) now, so the HTTP server's drain does not wait
        them out. Called before ``stop()``, while the server still serves."""
        ...

    async def stop(self) -> None: ...

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...
