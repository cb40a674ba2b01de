"""Whether the data plane runs compiled (setup.py), and a guard against a stale build.

The compiled modules sit next to their sources and Python imports them first.
After a source edit (or a checkout) without a rebuild, the old compiled code
would keep running while the source says otherwise: the worst kind of bug to
chase. setup.py records a digest of each source it compiled in
``compiled.json``; importing berth.gateway refuses a build whose sources have
changed since.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
from pathlib import Path

HERE = Path(__file__).parent
MANIFEST = HERE / "compiled.json"


class StaleBuild(ImportError):
    """Compiled modules that no longer match their sources."""


def digest(source: Path) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def compiled_modules(directory: Path = HERE) -> list[str]:
    """Modules of ``directory`` that have a compiled build next to their source."""
    names = set()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for path in directory.glob(f"*{suffix}"):
            name = path.name.removesuffix(suffix)
            if (directory / f"{name}.py").exists():
                names.add(name)
    return sorted(names)


def stale_modules(directory: Path = HERE) -> list[str]:
    """Compiled modules whose source differs from the one they were built from."""
    names = compiled_modules(directory)
    if not names:
        return []
    try:
        built = json.loads((directory / MANIFEST.name).read_text())["sources"]
    except (OSError, ValueError, KeyError, TypeError):
        return names  # no record of what was compiled: none can be trusted
    return [name for name in names if built.get(name) != digest(directory / f"{name}.py")]


def check_fresh(directory: Path = HERE) -> None:
    stale = stale_modules(directory)
    if stale:
        raise StaleBuild(
            f"the compiled gateway is older than its source ({', '.join(stale)}): "
            "rebuild it with `make` (or `pip install -e .`), or remove it with "
            "`make pure` to run the gateway interpreted"
        )


def is_compiled() -> bool:
    """True when the proxy runs from the compiled build (for logs and /status)."""
    from berth.gateway import proxy

    return not (proxy.__file__ or "").endswith(".py")
