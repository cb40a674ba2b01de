"""Gateway errors, grouped by what the caller decides.

``ClientError``: the request is refused with its status (never retried).
``Unavailable``: no server may take it now (503, Retry-After).
``UpstreamError``: one attempt failed; the retry loop decides whether to try
the next server, then answers with its status (502 or 504).
"""

from __future__ import annotations


class GatewayError(Exception):
    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class ClientError(GatewayError):
    status = 400
    code = "bad_request"


class BadRequest(ClientError, ValueError):
    pass


class RouteNotFound(ClientError, LookupError):
    status = 404
    code = "no_route"


class RequestTimeout(ClientError, TimeoutError):
    status = 408
    code = "request_timeout"


class BodyTooLarge(ClientError):
    status = 413
    code = "body_too_large"


class URITooLong(ClientError):
    status = 414
    code = "uri_too_long"


class HeadersTooLarge(ClientError):
    status = 431
    code = "headers_too_large"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"


class ExpectationFailed(ClientError):
    status = 417
    code = "expectation_failed"


class RateLimited(ClientError):
    status = 429
    code = "rate_limited"


class Unavailable(GatewayError):
    status = 503
    code = "unavailable"


class NoServer(Unavailable):
    code = "no_server"


class ConcurrencyLimited(Unavailable):
    code = "concurrency_limited"


class ClientGone(ConnectionError):
    """The client closed its connection while its request was being served."""


class UpstreamError(GatewayError):
    status = 502
    code = "upstream_error"


class UpstreamConnectError(UpstreamError, ConnectionError):
    code = "upstream_connect"


class UpstreamClosed(UpstreamError, ConnectionError):
    """The connection ended before a complete response (maybe a stale pooled one)."""

    code = "upstream_closed"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol"


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    code = "upstream_timeout"
