"""berth.gateway: the data plane (reverse proxy, routing, health checks, admin API)."""

from berth.gateway.compiled import check_fresh

check_fresh()
