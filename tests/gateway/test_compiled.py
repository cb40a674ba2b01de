"""The compiled build (setup.py): its stale-build guard, and source patterns
mypyc compiles differently from CPython, so they never reach the compiled modules."""

from __future__ import annotations

import ast
import importlib.machinery
import json
import os
import re
from pathlib import Path

import pytest

from berth.gateway import compiled

ROOT = Path(__file__).parents[2]
SETUP = (ROOT / "setup.py").read_text()
COMPILED = re.findall(r'^    "(src/berth/gateway/\w+\.py)",$', SETUP, re.M)


def test_setup_lists_the_data_plane() -> None:
    assert "src/berth/gateway/proxy.py" in COMPILED
    assert all((ROOT / path).is_file() for path in COMPILED)


def _functions(path: str) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse((ROOT / path).read_text())
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


@pytest.mark.parametrize("path", COMPILED)
def test_no_call_in_a_slice_bound(path: str) -> None:
    # mypyc evaluates a slice bound twice (a fast path for small ints, then the
    # generic one): `view[os.write(fd, view):]` wrote every access-log line twice.
    tree = ast.parse((ROOT / path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Slice):
            for bound in (node.lower, node.upper, node.step):
                calls = [n for n in ast.walk(bound) if isinstance(n, ast.Call)] if bound else []
                assert not calls, f"{path}:{node.lineno}: call in a slice bound"


@pytest.mark.parametrize("path", COMPILED)
def test_an_except_name_keeps_one_type_per_function(path: str) -> None:
    # mypyc gives a name one type per function: `except A as exc` followed by
    # `except B as exc` made the second handler raise TypeError.
    for func in _functions(path):
        types: dict[str, set[str]] = {}
        for node in ast.walk(func):
            if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                types.setdefault(node.name, set()).add(ast.unparse(node.type))
        clashes = {name: sorted(t) for name, t in types.items() if len(t) > 1}
        assert not clashes, f"{path}: {func.name} binds {clashes}"


def _package(tmp_path: Path, source: str) -> Path:
    (tmp_path / "proxy.py").write_text(source)
    (tmp_path / f"proxy{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    return tmp_path


def test_a_build_matching_its_sources_is_fresh(tmp_path: Path) -> None:
    d = _package(tmp_path, "x = 1\n")
    manifest = {"sources": {"proxy": compiled.digest(d / "proxy.py")}}
    (d / "compiled.json").write_text(json.dumps(manifest))
    assert compiled.compiled_modules(d) == ["proxy"]
    assert compiled.stale_modules(d) == []
    compiled.check_fresh(d)


def test_an_edited_source_makes_the_build_stale(tmp_path: Path) -> None:
    d = _package(tmp_path, "x = 1\n")
    manifest = {"sources": {"proxy": compiled.digest(d / "proxy.py")}}
    (d / "compiled.json").write_text(json.dumps(manifest))
    (d / "proxy.py").write_text("x = 2\n")
    with pytest.raises(compiled.StaleBuild, match=r"older than its source \(proxy\)"):
        compiled.check_fresh(d)


def test_a_build_without_its_manifest_is_not_trusted(tmp_path: Path) -> None:
    d = _package(tmp_path, "x = 1\n")
    assert compiled.stale_modules(d) == ["proxy"]
    (d / "compiled.json").write_text("{not json")
    assert compiled.stale_modules(d) == ["proxy"]


def test_no_build_is_fine(tmp_path: Path) -> None:
    (tmp_path / "proxy.py").write_text("x = 1\n")
    assert compiled.stale_modules(tmp_path) == []


@pytest.mark.skipif(
    os.environ.get("CI") != "true" or os.environ.get("BERTH_PURE_PYTHON") == "1",
    reason="the compiled build is optional outside CI",
)
def test_ci_runs_the_compiled_build() -> None:
    # CI has a C compiler, so a silent fallback to plain Python there means the
    # build broke: the suite would pass while the benchmarked code went untested.
    assert compiled.is_compiled()
