"""Errors of the store client, grouped by what the caller decides.

``StoreUnavailable``: retry later (network down, 5xx, 429). ``StoreRejected``:
the request is wrong, do not retry (other 4xx). ``PermissionDenied``: fix the token.
"""

from __future__ import annotations


class StoreError(Exception):
    pass


class StoreUnavailable(StoreError, ConnectionError):
    """The store could not be reached, failed (5xx) or rate-limited us (429); the
    call may succeed later."""


class StoreRejected(StoreError, ValueError):
    """The store refused the request as invalid (4xx); retrying will not help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class PermissionDenied(StoreRejected, PermissionError):
    pass


# -- raised by the embedded store while serving a request -------------------------
# The HTTP layer turns each into its status code and a plain-text message, the
# way Consul answers; nothing is applied when one is raised.


class RequestError(StoreError):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RequestError, ValueError):
    status = 400


class NotFound(RequestError, LookupError):
    status = 404


class MethodNotAllowed(RequestError):
    status = 405


class PayloadTooLarge(RequestError, ValueError):
    status = 413


class InvalidState(RequestError, RuntimeError):
    """Consul answers 500 for these: an unknown session on acquire, TTL on a non-TTL check."""

    status = 500
