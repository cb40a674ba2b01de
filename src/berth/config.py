"""Typed configuration shared by every component.

Each component declares one pydantic model (``GatewayConfig``, ``StoreConfig``,
...) and loads it with :func:`load`. Values are layered, lowest precedence
first: the model's defaults, the component's table in ``berth.toml``,
``BERTH_<SECTION>_<FIELD>`` environment variables (``BERTH_GATEWAY_PORT``),
then command-line flags. Settings that mean the same for every component
(:data:`SHARED_ENV`) are also read unqualified, e.g. ``BERTH_TOKEN``. A bad value
stops the start with one line naming the key, where it came from and what is
allowed, instead of a traceback.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

ENV_PREFIX = "BERTH_"
DEFAULT_FILE = "berth.toml"
# One value for the whole platform, so one variable sets it everywhere. Any
# other field (port, host...) means something different per component and is
# only read section-qualified, or BERTH_PORT would move every listener at once.
SHARED_ENV = frozenset({"token", "data_dir", "store_url"})


class ConfigError(ValueError):
    """A configuration value is missing or not allowed; the message is one line."""


class ComponentConfig(BaseModel):
    """Base for every component's config: unknown keys are an error, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


C = TypeVar("C", bound=ComponentConfig)


def _read_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        env_path = os.environ.get(ENV_PREFIX + "CONFIG")
        if env_path:
            path = Path(env_path)
        elif Path(DEFAULT_FILE).is_file():
            path = Path(DEFAULT_FILE)
        else:
            return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def env_name(section: str, field: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{field.upper()}"


def _from_env(
    model: type[ComponentConfig], section: str, env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """Values from the environment, and the variable each came from."""
    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    for field in model.model_fields:
        candidates = [env_name(section, field)]
        if field in SHARED_ENV:
            candidates.append(ENV_PREFIX + field.upper())
        for name in candidates:
            if (raw := env.get(name)) is not None:
                values[field] = raw
                names[field] = name
                break
    return values, names


def load(
    model: type[C],
    section: str,
    flags: Mapping[str, Any] | None = None,
    *,
    file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> C:
    """Build ``model`` from berth.toml ``[section]``, BERTH_* env and flags (None = not given)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    table = _read_toml(file).get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"berth.toml: [{section}] must be a table")
    layers.append((f"berth.toml [{section}]", table))
    env_values, env_names = _from_env(model, section, os.environ if env is None else env)
    layers.append(("environment", env_values))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))

    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for source, values in layers:
        for key, value in values.items():
            merged[key] = value
            origin[key] = source
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or section
        top = str(err["loc"][0]) if err["loc"] else ""
        source = origin.get(top, "default")
        shown = env_names[top] if source == "environment" else key
        value = merged.get(top, "<missing>")
        raise ConfigError(f"bad config {shown} = {value!r} (from {source}): {err['msg']}") from None
