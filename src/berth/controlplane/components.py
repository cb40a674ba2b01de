"""The one place that decides which components the control plane hosts."""

from __future__ import annotations

from berth.config import load
from berth.controlplane.component import Component
from berth.controlplane.config import ControlPlaneConfig


def build_components(config: ControlPlaneConfig, self_url: str) -> list[Component]:
    """Components in start order. ``self_url`` is this control plane's own bound URL:
    with the embedded store, the other components reach it there, through the
    same protocol they would use against an external Consul at ``store_url``."""
    store_url = config.store_url or self_url
    components: list[Component] = []
    if config.store_url is None:
        from berth.store.config import load_store_config
        from berth.store.server import StoreServer

        components.append(StoreServer(load_store_config(config.data_dir / "store")))
    from berth.scheduler.api import SchedulerComponent
    from berth.scheduler.config import SchedulerConfig

    scheduler_config = load(
        SchedulerConfig, "scheduler", {"data_dir": config.data_dir / "scheduler"}
    )
    components.append(SchedulerComponent(scheduler_config, store_url, config.token))
    return components
