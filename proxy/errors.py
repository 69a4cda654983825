"""GatewayError tree: each outcome knows its HTTP status, code and title, and renders
itself as an RFC 9457 problem+json response."""
from __future__ import annotations

import json
from functools import lru_cache
from typing import ClassVar

from .headers import Header


class GatewayError(Exception):
    """An answer the gateway gives itself instead of the upstream's."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal gateway error"
    # no status the gateway answers with is cacheable by default (RFC 9111 4.2.2); say so anyway
    no_store: ClassVar[tuple[Header, ...]] = ((b"cache-control", b"no-store"),)

    def __init__(self, detail: str, *, retry_after: int | None = None,
                 headers: list[Header] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.headers = headers or []

    def render(self) -> tuple[int, list[Header], bytes]:
        """Status, headers and body of the problem+json answer."""
        body = _problem_json(self.status, self.code, self.title, self.detail, self.retry_after)
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            *self.no_store,
            *self.headers,
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return self.status, headers, body


class BadRequest(GatewayError):
    status, code, title = 400, "bad_request", "Bad request"


class MethodNotAllowed(GatewayError):
    status, code, title = 405, "method_not_allowed", "Method not allowed"


class RequestTimeout(GatewayError):
    status, code, title = 408, "request_timeout", "Request body too slow"


class RequestTooLarge(GatewayError):
    status, code, title = 413, "body_too_large", "Request body too large"


class HeadersTooLarge(GatewayError):
    status, code, title = 431, "headers_too_large", "Request header fields too large"


class RateLimited(GatewayError):
    status, code, title = 429, "rate_limited", "Too many requests"
    # RFC 6585 4: a 429 MUST NOT be stored by a cache, so the header would only repeat it -- and
    # under a flood every response header costs (Hypercorn and h11 validate each one)
    no_store = ()


class UpstreamUnreachable(GatewayError):
    status, code, title = 502, "upstream_unreachable", "Upstream unreachable"


class QueueTimeout(GatewayError):
    status, code, title = 503, "queue_timeout", "Gateway overloaded"


class LimiterUnavailable(GatewayError):
    status, code, title = 503, "limiter_unavailable", "Rate limiter unavailable"


class UpstreamTimeout(GatewayError):
    status, code, title = 504, "upstream_timeout", "Upstream timed out"


class NotImplementedByGateway(GatewayError):
    status, code, title = 501, "not_implemented", "Not implemented"


class VersionNotSupported(GatewayError):
    status, code, title = 505, "http_version_not_supported", "HTTP version not supported"


@lru_cache(maxsize=1024)
def _problem_json(status: int, code: str, title: str, detail: str, retry_after: int | None) -> bytes:
    """The RFC 9457 body, encoded once per distinct answer: a flood of refusals repeats a few
    bodies (one per retry delay), and json.dumps was ~4% of a refusal. Bounded by maxsize."""
    problem: dict[str, object] = {
        "type": f"urn:gateway:problem:{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "error": code,
    }
    if retry_after is not None:
        problem["retry_after"] = retry_after
    return json.dumps(problem, separators=(",", ":")).encode()
