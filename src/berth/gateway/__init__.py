"""berth.gateway: the data plane (reverse proxy, routing, health checks, admin API)."""
