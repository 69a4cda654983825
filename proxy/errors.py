"""GatewayError tree: each outcome knows its HTTP status, code and title, and renders
itself as an RFC 9457 problem+json response."""
from __future__ import annotations

import json
from typing import ClassVar

from .headers import Header


class GatewayError(Exception):
    """An answer the gateway gives itself instead of the upstream's."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal gateway error"

    def __init__(self, detail: str, *, retry_after: int | None = None,
                 headers: list[Header] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.headers = headers or []

    def problem(self) -> dict[str, object]:
        body: dict[str, object] = {
            "type": f"urn:gateway:problem:{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "error": self.code,
        }
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body

    def render(self) -> tuple[int, list[Header], bytes]:
        """Status, headers and body of the problem+json answer."""
        body = json.dumps(self.problem(), separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *self.headers,
        ]
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        return self.status, headers, body


class BadRequest(GatewayError):
    status, code, title = 400, "bad_request", "Bad request"


class RequestTooLarge(GatewayError):
    status, code, title = 413, "body_too_large", "Request body too large"


class RateLimited(GatewayError):
    status, code, title = 429, "rate_limited", "Too many requests"


class UpstreamUnreachable(GatewayError):
    status, code, title = 502, "upstream_unreachable", "Upstream unreachable"


class QueueTimeout(GatewayError):
    status, code, title = 503, "queue_timeout", "Gateway overloaded"


class LimiterUnavailable(GatewayError):
    status, code, title = 503, "limiter_unavailable", "Rate limiter unavailable"


class UpstreamTimeout(GatewayError):
    status, code, title = 504, "upstream_timeout", "Upstream timed out"
