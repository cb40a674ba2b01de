"""Compiles the gateway's per-request path with mypyc; everything else stays Python.

The gateway relays every request of the platform, and in CPython its cost is
spread over many small typed steps (routing, balancing, header rewriting,
metrics, the access log) with no single hotspot left to rewrite. mypyc turns
exactly that kind of code into C from the type annotations the code already
has (mypy --strict), which cuts the gateway's own Python time per small request
from about 22 us to 9 (README, "Gateway benchmark"). The modules stay plain Python: mypy, ruff and a
debugger see the same source, and the package works without the compiled
build.

``BERTH_PURE_PYTHON=1`` skips the compiled build, and it is skipped with a
warning when it cannot be made (no C compiler). Project metadata is in
pyproject.toml; this file only adds the extension modules.

Where compiled code differs from CPython (each found here the hard way; the
suite runs on the compiled build, tests/gateway/test_compiled.py guards the
first two):
- a call in a slice bound runs twice (``view[os.write(fd, view):]`` wrote twice);
- an except-name gets one type per function (a second ``except B as exc``
  after ``except A as exc`` raises TypeError);
- third-party stubs are trusted at run time: httptools' declare URL parts as
  never None, so reading an absent one raises TypeError unless read as Any;
- for speed: an f-string with a format spec becomes one str.format call per
  field, and a dataclass keeps the interpreted ``__init__`` (not for objects
  made per request); a Final constant of a fixed-length tuple type is a C
  struct that is boxed into a new tuple each time it is iterated (annotate
  ``tuple[float, ...]``); module constants without Final are dict lookups;
  ``isinstance(x, BaseException)`` looks the builtins name up on every call
  (``isinstance(x, int)`` is a type test); a Protocol-typed attribute's
  methods are called by name (type it as the class where there is one);
  methods of bytes other than join, startswith, endswith and translate
  (find, lower, split) are generic calls, and ``needle in data`` for bytes
  raises and clears a TypeError inside CPython on every test.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The data plane: what runs for every proxied request. The control-plane
# modules (discovery, admin, health checks, workers) run a few times a second
# and stay interpreted, which keeps them easy to patch and debug in production.
COMPILED = [
    "src/berth/gateway/accesslog.py",
    "src/berth/gateway/balancer.py",
    "src/berth/gateway/cluster.py",
    "src/berth/gateway/exchange.py",
    "src/berth/gateway/headers.py",
    "src/berth/gateway/limits.py",
    "src/berth/gateway/metrics.py",
    "src/berth/gateway/proxy.py",
    "src/berth/gateway/routes.py",
    "src/berth/gateway/upstream.py",
]


class OptionalBuildExt(build_ext):
    """Falls back to the pure-Python package when the C build fails, as
    MarkupSafe and simplejson do for their speedups. After a complete build it
    records what each module was compiled from (berth/gateway/compiled.py
    refuses a build whose sources changed since)."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            super().run()
        except Exception as exc:  # any build failure means "stay pure"
            print(
                f"berth: compiled gateway not built ({exc}); the gateway runs as plain Python",
                file=sys.stderr,
            )
            return
        self.write_manifest()

    def write_manifest(self) -> None:
        target = Path(self.get_ext_fullpath("berth.gateway.proxy")).parent
        sources = {
            Path(path).stem: hashlib.sha256(Path(path).read_bytes()).hexdigest()
            for path in COMPILED
        }
        (target / "compiled.json").write_text(json.dumps({"sources": sources}, indent=1))


def extensions() -> list[Any]:
    if os.environ.get("BERTH_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    # mypyc type-checks what it compiles. When pip builds the package in an
    # isolated environment the third-party dependencies are not installed, so
    # their values are read as Any (generic, never stricter: see the note on
    # stubs above), and the strict checks that would reject that are left to
    # `make lint`, which runs them with everything installed.
    options = ["--config-file=", "--ignore-missing-imports", "--follow-imports=silent"]
    return list(mypycify([*options, *COMPILED], group_name="berth_gateway"))


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
