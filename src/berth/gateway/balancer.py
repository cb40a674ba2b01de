"""Load-balancing decisions: pure functions over servers, no I/O.

Smooth weighted round-robin is nginx's algorithm (ngx_http_upstream_round_robin.c),
least-connections is nginx's weighted variant with round-robin among ties, and the
consistent-hash ring uses ~160 virtual nodes per unit of weight, like ketama.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from berth.gateway.cluster import Server
    from berth.gateway.routes import Route

VNODES_PER_WEIGHT: Final = 160
# Bounds the ring so a cluster of heavy weights cannot make a table swap slow.
MAX_RING_POINTS: Final = 40_000


def smooth_weighted(candidates: Sequence[Server]) -> Server:
    """nginx's smooth weighted round-robin: spreads picks evenly within the cycle.

    Each server's ``effective_weight`` is halved on failure (cluster.py) and grows
    back by one per round here, so a flaky server is eased back in.
    """
    if len(candidates) == 1:
        return candidates[0]
    total = 0
    best: Server | None = None
    top = 0
    for server in candidates:
        effective = server.effective_weight
        current = server.current_weight = server.current_weight + effective
        total += effective
        if effective < server.weight:
            server.effective_weight = effective + 1
        # The first server with the highest current weight wins ties.
        if best is None or current > top:
            best, top = server, current
    assert best is not None  # candidates is not empty
    best.current_weight -= total
    return best


def least_conn(candidates: Sequence[Server]) -> Server:
    """Fewest in-flight requests per unit of weight; ties go round-robin."""
    if len(candidates) == 1:
        return candidates[0]
    best = candidates[0]
    tied: list[Server] = [best]
    for server in candidates[1:]:
        # Compare active/weight without division: a.active * b.weight vs b.active * a.weight.
        lhs = server.active * best.weight
        rhs = best.active * server.weight
        if lhs < rhs:
            best = server
            tied = [server]
        elif lhs == rhs:
            tied.append(server)
    return tied[0] if len(tied) == 1 else smooth_weighted(tied)


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring over a fixed set of servers.

    The ring holds every server of the level, available or not; a lookup walks
    clockwise past servers the caller rejects. So a server going down moves only
    its own keys (to its ring neighbours), and they come back when it recovers.
    """

    __slots__ = ("_owners", "_points", "servers")

    def __init__(self, servers: Sequence[Server], vnodes_per_weight: int = VNODES_PER_WEIGHT):
        self.servers = tuple(servers)
        total_weight = sum(s.weight for s in self.servers) or 1
        per_weight = max(1, min(vnodes_per_weight, MAX_RING_POINTS // total_weight))
        points: list[tuple[int, int]] = []
        for index, server in enumerate(self.servers):
            # The address, not the position, seeds the points: the ring is the same
            # whatever order discovery lists the servers in.
            seed = server.address.encode()
            for vnode in range(server.weight * per_weight):
                points.append((_point(seed + b"#%d" % vnode), index))
        points.sort()
        self._points = [p for p, _ in points]
        self._owners = [i for _, i in points]

    def __repr__(self) -> str:
        return f"<HashRing servers={len(self.servers)} points={len(self._points)}>"

    def lookup(self, key: bytes, accept: Callable[[Server], bool]) -> Server | None:
        if not self._points:
            return None
        n = len(self._points)
        start = bisect.bisect_left(self._points, _point(key))
        seen: set[int] = set()
        for step in range(n):
            owner = self._owners[(start + step) % n]
            if owner in seen:
                continue
            server = self.servers[owner]
            if accept(server):
                return server
            seen.add(owner)
            if len(seen) == len(self.servers):
                break
        return None


def hash_key(route: Route, uri: bytes, client_ip: str, header: bytes | None) -> bytes | None:
    """The consistent-hash key for a request under ``route.hash_on``.

    ``header`` is the value of ``route.hash_header`` in the request, if any.
    None (e.g. the header is missing) makes the cluster fall back to round-robin.
    """
    if route.hash_on == "uri":
        return uri
    if route.hash_on == "ip":
        return client_ip.encode()
    return header or None
