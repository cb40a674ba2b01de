"""Listening sockets for every berth server: bound before serving, so a busy
port fails at start with one clear error and port 0 is known up front."""

from __future__ import annotations

import socket


class PortInUseError(OSError):
    pass


def bind(host: str, port: int, *, reuse_port: bool = False, backlog: int = 2048) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only
    # when proto says TCP; without it every keep-alive response waits ~40 ms
    # for a delayed ACK (uvloop sets it regardless).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        # Gateway workers share the data port; the kernel spreads connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortInUseError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock
