from __future__ import annotations

import os

# Tests never read a berth.toml or BERTH_* settings from the developer's shell.
for _key in [k for k in os.environ if k.startswith("BERTH_")]:
    del os.environ[_key]
