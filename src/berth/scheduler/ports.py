"""Host ports for tasks, from a range, never two tasks on one port.

A port is handed out only if berth does not hold it and a bind on the task's
host succeeds right now; the task may still lose a race with another program,
in which case it fails and is replaced on another port (Marathon's behaviour
with requirePorts=false).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable


class NoPortsLeft(RuntimeError):
    pass


def port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # No SO_REUSEADDR: a port in TIME_WAIT from a stopped task counts as busy,
        # so a new task never gets a port that old connections still point at.
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    def __init__(self, host: str, low: int, high: int) -> None:
        self.host = host
        self.low = low
        self.high = high
        self._held: set[int] = set()
        # Start from a random point so restarts and parallel berths spread out.
        self._next = random.randint(low, high)

    def __repr__(self) -> str:
        return f"<PortAllocator {self.low}-{self.high} held={len(self._held)}>"

    def allocate(self, count: int, requested: Iterable[int] = ()) -> list[int]:
        """``requested`` non-zero ports are required as given; zeros are picked from the range."""
        wanted = list(requested) or [0] * count
        chosen: list[int] = []
        try:
            for port in wanted:
                if port:
                    if port in self._held or not port_is_free(self.host, port):
                        raise NoPortsLeft(f"port {port} is in use")
                    chosen.append(port)
                else:
                    chosen.append(self._pick(set(chosen)))
                self._held.add(chosen[-1])
        except NoPortsLeft:
            self.release(chosen)
            raise
        return chosen

    def _pick(self, taken: set[int]) -> int:
        size = self.high - self.low + 1
        for _ in range(size):
            port = self._next
            self._next = self.low if port >= self.high else port + 1
            if port not in self._held and port not in taken and port_is_free(self.host, port):
                return port
        raise NoPortsLeft(f"no free port in {self.low}-{self.high}")

    def release(self, ports: Iterable[int]) -> None:
        self._held.difference_update(ports)
