"""Errors the client raises: every non-2xx answer carries the service's problem+json."""

from __future__ import annotations

import json
from typing import Any


class GradiagError(Exception):
    """An answer that is not a report: a problem+json (RFC 9457) from the service, or a
    gateway's page, or no answer at all (`GradiagUnavailable`).

    `status` is the HTTP status (None when nothing answered); `title`, `detail` and
    `errors` (a list of `{"loc": [...], "msg": ..., "node": ...}`) come from the problem
    document; `problem` is that whole document (extra members such as `limit` included)."""

    def __init__(
        self,
        status: int | None,
        title: str,
        detail: str,
        errors: list[dict[str, Any]] | None = None,
        problem: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if status else f"{title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors or []
        self.problem = problem or {}

    @property
    def type(self) -> str:
        return str(self.problem.get("type", "about:blank"))

    @property
    def is_client_error(self) -> bool:
        """The request is at fault (4xx): fix the body, not the service."""
        return self.status is not None and 400 <= self.status < 500

    @classmethod
    def from_answer(cls, status: int, content_type: str, content: bytes) -> GradiagError:
        """The problem+json of a non-2xx answer; a proxy's HTML page becomes a short detail."""
        problem: Any = None
        if "json" in content_type:
            try:
                problem = json.loads(content)
            except (ValueError, RecursionError):
                problem = None
        if isinstance(problem, dict) and isinstance(problem.get("title"), str):
            errors = problem.get("errors")
            return cls(
                status,
                problem["title"],
                str(problem.get("detail", problem["title"])),
                errors=errors if isinstance(errors, list) else None,
                problem=problem,
            )
        text = content.decode("utf-8", errors="replace").strip()
        detail = " ".join(text.split())[:300] or "(empty body)"
        return cls(status, _REASONS.get(status, "HTTP error"), detail)


class GradiagUnavailable(GradiagError):
    """Nothing answered: connection refused or reset, DNS failure, or a timeout (after the
    configured retries). `status` is None."""

    def __init__(self, detail: str) -> None:
        super().__init__(None, "Service unavailable", detail)


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
