"""The one place that decides which components the control plane hosts."""

from __future__ import annotations

from berth.controlplane.component import Component
from berth.controlplane.config import ControlPlaneConfig


def build_components(config: ControlPlaneConfig) -> list[Component]:
    components: list[Component] = []
    if config.store_url is None:
        from berth.store.config import StoreConfig
        from berth.store.server import StoreServer

        components.append(StoreServer(StoreConfig(data_dir=config.data_dir / "store")))
    return components
