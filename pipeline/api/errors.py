"""The Bill API's error body (seed 003): ``{"code": ..., "message": ..., "details": {...}}``, pure.

Codes (lower case, as the seed): ``unauthenticated`` 401, ``permission_denied`` 403, ``not_found`` 404,
``idempotency_conflict`` / ``failed_precondition`` 409, ``invalid_argument`` 400/422, ``unavailable`` 503,
``deadline_exceeded`` 504.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

HTTP_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied", 404: "not_found",
              405: "method_not_allowed", 409: "failed_precondition", 413: "invalid_argument",
              415: "invalid_argument", 422: "invalid_argument", 503: "unavailable", 504: "deadline_exceeded"}


class ErrorBody(BaseModel):
    """Every error of the Bill API."""

    code: str = Field(examples=["invalid_argument"])
    message: str = Field(examples=["amount must not be zero"])
    details: dict[str, Any] = Field(default_factory=dict)


class BillApiError(Exception):
    """An error answer: HTTP ``status`` with ``ErrorBody(code, message, details)`` and extra ``headers``."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details or {}
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"code": self.code, "message": self.message, "details": self.details}


def from_validation(errors: list[dict[str, Any]]) -> BillApiError:
    """A FastAPI/pydantic validation error list → 422 ``invalid_argument``: the message names the first
    problem's field (``body.amount``), ``details.errors`` lists every problem as ``{field, message, type}``."""
    problems = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        problems.append({"field": ".".join(loc), "message": str(err.get("msg", "invalid")),
                         "type": str(err.get("type", ""))})
    if not problems:
        return BillApiError(422, "invalid_argument", "invalid request")
    first = problems[0]
    return BillApiError(422, "invalid_argument", f"{first['field']}: {first['message']}", {"errors": problems})


def from_http(status: int, detail: Any) -> BillApiError:
    """A Starlette HTTP error (unknown route 404, wrong method 405, ...) in the error shape."""
    return BillApiError(status, HTTP_CODES.get(status, "unknown"), str(detail))
