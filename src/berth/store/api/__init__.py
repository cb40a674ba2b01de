"""The store's HTTP API: Consul's /v1 subset as a hand-rolled ASGI callable."""
