from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from berth.config import ComponentConfig, ConfigError, load


class DemoConfig(ComponentConfig):
    port: int = Field(3130, ge=0, le=65535)
    mode: Literal["fast", "safe"] = "safe"
    name: str = "demo"


def test_defaults() -> None:
    assert load(DemoConfig, "demo", env={}) == DemoConfig()


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "berth.toml"
    toml.write_text('[demo]\nport = 1000\nmode = "fast"\nname = "file"\n')
    cfg = load(DemoConfig, "demo", {"name": "flag"}, file=toml, env={"BERTH_DEMO_PORT": "2000"})
    assert (cfg.port, cfg.mode, cfg.name) == (2000, "fast", "flag")


def test_flags_that_are_none_do_not_override(tmp_path: Path) -> None:
    cfg = load(DemoConfig, "demo", {"port": None}, env={"BERTH_DEMO_PORT": "2000"})
    assert cfg.port == 2000


def test_unqualified_env_only_for_platform_wide_settings() -> None:
    class WithToken(DemoConfig):
        token: str | None = None

    cfg = load(WithToken, "demo", env={"BERTH_PORT": "2000", "BERTH_TOKEN": "s3cret-token"})
    assert (cfg.port, cfg.token) == (3130, "s3cret-token")
    cfg = load(
        WithToken, "demo", env={"BERTH_TOKEN": "shared-token", "BERTH_DEMO_TOKEN": "own-token"}
    )
    assert cfg.token == "own-token"


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load(DemoConfig, "demo", env={"BERTH_DEMO_MODE": "turbo"})
    message = str(err.value)
    assert "BERTH_DEMO_MODE" in message and "'turbo'" in message and "fast" in message
    assert "\n" not in message


def test_bad_flag_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"port = 70000 \(from flag\).*65535"):
        load(DemoConfig, "demo", {"port": 70000}, env={})


def test_unknown_key_in_file(tmp_path: Path) -> None:
    toml = tmp_path / "berth.toml"
    toml.write_text("[demo]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load(DemoConfig, "demo", file=toml, env={})


def test_invalid_toml(tmp_path: Path) -> None:
    toml = tmp_path / "berth.toml"
    toml.write_text("[demo\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(DemoConfig, "demo", file=toml, env={})
