"""Errors of berth.services, grouped by what the client should do next.

Every error becomes a JSON body ``{"error": code, "message": ...}`` with the
status below; pyvips errors are translated at the boundary (``imaging.py``) so
nothing from libvips leaks out as a traceback.
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# --- the request is wrong: fix it before retrying -----------------------------------------


class BadRequest(ServiceError, ValueError):
    status = 400
    code = "bad_request"


class InvalidParameter(BadRequest):
    """A processing parameter is unknown or has a bad value; ``key`` names it."""

    code = "invalid_parameter"

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class CorruptImage(BadRequest):
    code = "corrupt_image"


class ClientDisconnected(BadRequest):
    """The client closed the connection before its body was complete; nobody reads the answer."""

    status = 499  # nginx's "client closed request", so logs and metrics tell it apart
    code = "client_disconnected"


class NotAnImage(ServiceError, ValueError):
    status = 415
    code = "unsupported_media_type"


class BodyTooLarge(ServiceError, ValueError):
    status = 413
    code = "body_too_large"


class BodyTimeout(ServiceError, TimeoutError):
    status = 408
    code = "body_timeout"


class ImageTooLarge(ServiceError, ValueError):
    """Dimensions or pixel count (frames included) over the configured limits."""

    status = 422
    code = "image_too_large"


class NotFound(ServiceError, LookupError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"


# --- the server cannot do it now: retry later or elsewhere ----------------------------------


class Overloaded(ServiceError):
    status = 503
    code = "overloaded"


class ProcessingTimeout(ServiceError, TimeoutError):
    status = 504
    code = "processing_timeout"
