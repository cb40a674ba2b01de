"""The `berth` command's global options, run as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import BerthProcess


def berth(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "berth.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_bad_value_in_config_file_is_one_line_naming_key_and_source(tmp_path: Path) -> None:
    toml = tmp_path / "berth.toml"
    toml.write_text("[server]\nport = 70000\n")
    result = berth("--config", str(toml), "server", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "berth: bad config port = 70000 (from berth.toml [server]): "
        "Input should be less than or equal to 65535"
    ]


def test_flag_beats_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "berth.toml"
    toml.write_text("[server]\nport = 70000\n")
    proc = BerthProcess(
        ["--config", str(toml), "server", "--port", "0", "--data-dir", str(tmp_path)]
    )
    try:
        assert proc.wait_ready().startswith("http://127.0.0.1:")
    finally:
        proc.stop()


def test_json_log_format(tmp_path: Path) -> None:
    proc = BerthProcess(
        ["--log-format", "json", "server", "--port", "0", "--data-dir", str(tmp_path)]
    )
    try:
        proc.wait_ready()
    finally:
        proc.stop()
    records = [json.loads(line) for line in proc.lines if line.startswith("{")]
    listening = [r for r in records if "listening on" in r["msg"]]
    assert listening and listening[0]["level"] == "info"
    assert listening[0]["logger"] == "berth.controlplane"
    assert listening[0]["time"].endswith("Z")


def test_component_sections_reach_components_inside_the_control_plane(tmp_path: Path) -> None:
    toml = tmp_path / "berth.toml"
    toml.write_text('[scheduler]\nlimits = "sometimes"\n')
    result = berth("--config", str(toml), "server", "--port", "0", "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "limits = 'sometimes' (from berth.toml [scheduler])" in result.stderr

    env = {**os.environ, "BERTH_SCHEDULER_PORT_RANGE_MIN": "80"}
    result = berth("server", "--port", "0", "--data-dir", str(tmp_path), env=env)
    assert result.returncode == 2
    assert "BERTH_SCHEDULER_PORT_RANGE_MIN = '80'" in result.stderr
