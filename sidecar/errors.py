"""Protocol-neutral causes of a refused or failed request.

Handlers raise `SidecarError(Cause.X, message)`; the route family renders it as OpenAI or Anthropic
JSON at the edge (`families.py`). Each cause knows its HTTP status and whether a retry can help.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _CauseInfo:
    code: str  # unique per cause: enum members with equal values would silently become aliases
    status: int
    openai_type: str
    anthropic_type: str
    retryable: bool


class Cause(enum.Enum):
    BAD_JSON = _CauseInfo("bad_json", 400, "invalid_request_error", "invalid_request_error", False)
    BAD_REQUEST = _CauseInfo("bad_request", 400, "invalid_request_error", "invalid_request_error", False)
    BAD_IMAGE = _CauseInfo("bad_image", 400, "invalid_request_error", "invalid_request_error", False)
    TOO_MANY_IMAGES = _CauseInfo("too_many_images", 400, "invalid_request_error", "invalid_request_error", False)
    TOO_MANY_PARTS = _CauseInfo("too_many_parts", 400, "invalid_request_error", "invalid_request_error", False)
    # A part type only the sidecar may produce (tensor descriptors), sent by a client.
    FORBIDDEN_PART = _CauseInfo("forbidden_part", 400, "invalid_request_error", "invalid_request_error", False)
    UNSUPPORTED_PART = _CauseInfo("unsupported_part", 400, "invalid_request_error", "invalid_request_error", False)
    # A body whose JSON structure alone would cost the event loop too much to parse.
    BODY_TOO_COMPLEX = _CauseInfo("body_too_complex", 413, "invalid_request_error", "request_too_large", False)
    NOT_FOUND = _CauseInfo("not_found", 404, "invalid_request_error", "not_found_error", False)
    IMAGE_TOO_LARGE = _CauseInfo("image_too_large", 400, "invalid_request_error", "invalid_request_error", False)
    REMOTE_URL_FORBIDDEN = _CauseInfo(
        "remote_url_forbidden", 400, "invalid_request_error", "invalid_request_error", False
    )
    BODY_TIMEOUT = _CauseInfo("body_timeout", 408, "invalid_request_error", "invalid_request_error", False)
    # Request headers that did not arrive in time (connections.py): a plain 408, then the connection
    # closes. Counted in mm_sidecar_rejections_total like the others; no API shape (no request yet).
    HEADER_TIMEOUT = _CauseInfo("header_timeout", 408, "invalid_request_error", "invalid_request_error", False)
    BODY_TOO_LARGE = _CauseInfo("body_too_large", 413, "invalid_request_error", "request_too_large", False)
    OVER_BUDGET = _CauseInfo("over_budget", 413, "invalid_request_error", "request_too_large", False)
    QUEUE_FULL = _CauseInfo("queue_full", 429, "rate_limit_error", "rate_limit_error", True)
    QUEUE_TIMEOUT = _CauseInfo("queue_timeout", 429, "rate_limit_error", "rate_limit_error", True)
    BODY_MEMORY_FULL = _CauseInfo("body_memory_full", 503, "service_unavailable", "overloaded_error", True)
    FETCH_FAILED = _CauseInfo("fetch_failed", 400, "invalid_request_error", "invalid_request_error", False)
    FETCH_UNAVAILABLE = _CauseInfo("fetch_unavailable", 502, "upstream_error", "api_error", True)
    PREPROCESS_FAILED = _CauseInfo("preprocess_failed", 500, "server_error", "api_error", True)
    PREPROCESS_UNAVAILABLE = _CauseInfo("preprocess_unavailable", 503, "service_unavailable", "overloaded_error", True)
    SHUTTING_DOWN = _CauseInfo("shutting_down", 503, "service_unavailable", "overloaded_error", True)
    UPSTREAM_UNAVAILABLE = _CauseInfo("upstream_unavailable", 502, "upstream_error", "api_error", True)
    UPSTREAM_TIMEOUT = _CauseInfo("upstream_timeout", 504, "upstream_error", "api_error", True)
    UPSTREAM_BAD_RESPONSE = _CauseInfo("upstream_bad_response", 502, "upstream_error", "api_error", True)

    @property
    def status(self) -> int:
        return self.value.status

    @property
    def retryable(self) -> bool:
        return self.value.retryable

    @property
    def code(self) -> str:
        return self.value.code


class SidecarError(Exception):
    """A request the sidecar refuses or cannot complete.

    `param` names the offending part of the body (`messages[2].content[1]`), as OpenAI's `param` does.
    """

    def __init__(self, cause: Cause, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.message = message
        self.param = param

    @property
    def status(self) -> int:
        return self.cause.status
