"""Errors of the store client, grouped by what the caller decides.

``StoreUnavailable``: retry later (network down, 5xx). ``StoreRejected``: the
request is wrong, do not retry (4xx). ``PermissionDenied``: fix the token.
"""

from __future__ import annotations


class StoreError(Exception):
    pass


class StoreUnavailable(StoreError, ConnectionError):
    """The store could not be reached or failed (5xx); the call may succeed later."""


class StoreRejected(StoreError, ValueError):
    """The store refused the request as invalid (4xx); retrying will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class PermissionDenied(StoreRejected, PermissionError):
    pass
