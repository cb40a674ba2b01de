"""The control plane process: one ASGI app hosting the store, scheduler and APIs."""
