"""Which KV keys the store accepts."""

from __future__ import annotations

import re

from berth.store.errors import BadRequest

# C0 controls, DEL and C1 controls: never part of a sane key, and dangerous in
# logs and terminals.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def key_problem(key: str) -> str | None:
    """Why ``key`` is refused, or None. Consul (since the CVE-2025-11392 fix)
    refuses path traversal and surrounding whitespace; berth adds control characters."""
    if _CONTROL.search(key):
        return "contains control characters"
    if key[:1].isspace() or key[-1:].isspace():
        return "has leading or trailing whitespace"
    # Splitting only when a dot is there keeps the common key on the fast path.
    if "." in key:
        for segment in key.replace("\\", "/").split("/"):
            if segment in (".", ".."):
                return "contains a path traversal segment ('.' or '..')"
    return None


def validate_key(key: str) -> None:
    problem = key_problem(key)
    if problem is not None:
        raise BadRequest(f"Invalid key {key!r}: {problem}")
