"""Errors as RFC 9457 problem details (``application/problem+json``): a
``type`` URI naming the kind of problem (listed in docs/api.md and the
OpenAPI document), its ``title``, the HTTP ``status``, and a ``detail`` for
this occurrence. An operation raises a :class:`Problem`; one handler answers."""

from __future__ import annotations

import json
from typing import Any

TYPE = "urn:legacy-auth-proxy:problem:"
CONTENT_TYPE = b"application/problem+json"


class Problem(Exception):
    status = 500
    slug = "internal"
    title = "Something went wrong"

    def __init__(self, detail: str, *, headers: dict[bytes, bytes] | None = None,
                 **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"type": TYPE + self.slug, "title": self.title, "status": self.status,
                "detail": self.detail, **self.extra}

    def answer(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"Content-Type", CONTENT_TYPE)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return json.dumps(self.body(), ensure_ascii=False).encode("utf-8")


def kind(status: int, slug: str, title: str) -> type[Problem]:
    return type(slug.title().replace("-", ""), (Problem,),
                {"status": status, "slug": slug, "title": title})


BadRequest = kind(400, "bad-request", "The request is not valid")
Unauthenticated = kind(401, "unauthenticated", "A valid API token is needed")
Forbidden = kind(403, "forbidden", "The token's scope does not allow this")
NotFound = kind(404, "not-found", "Not found")
MethodNotAllowed = kind(405, "method-not-allowed", "The method is not allowed here")
NotAcceptable = kind(406, "not-acceptable", "The API answers in JSON only")
Conflict = kind(409, "conflict", "The request conflicts with what is stored")
PreconditionFailed = kind(412, "precondition-failed", "It changed since it was read")
UnsupportedMediaType = kind(415, "unsupported-media-type", "Send JSON")
PreconditionRequired = kind(428, "precondition-required", "Send If-Match with the ETag you read")
TooManyRequests = kind(429, "rate-limited", "Too many requests")
Unavailable = kind(503, "unavailable", "Try again in a moment")
