"""Gateway errors and their OpenAI-shaped responses: the one place `/v1/*` errors are written.

Services below the gateway raise domain exceptions; the view translates them here. Messages
are written for the API caller: they never carry upstream secrets, URLs or tracebacks.
"""

from __future__ import annotations

import json

from gateway.wire import COST_HEADER, JsonAnswer
from portal.logs import new_request_id


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidApiKey(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PaymentRequired(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_credit"


class SpendCapReached(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "spend_cap_reached"


class ModelNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class AddressNotAllowed(GatewayError):
    status = 403
    type = "permission_error"
    code = "ip_not_allowed"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = max(1, retry_after_seconds)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_seconds)}


class ServiceUnavailable(GatewayError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class ProcessAtCapacity(ServiceUnavailable):
    """This process serves as many requests as GATEWAY_MAX_REQUESTS_PER_PROCESS allows."""

    code = "process_at_capacity"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class UnknownEndpoint(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_endpoint"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"

    def __init__(self, message: str, *, allowed: str) -> None:
        super().__init__(message)
        self.allowed = allowed

    @property
    def headers(self) -> dict[str, str]:
        return {"Allow": self.allowed}  # RFC 9110: a 405 names the methods the path takes


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamFailed(GatewayError):
    """The provider failed before answering. `retryable` failures (unreachable, timed out,
    5xx, 429) let the gateway try the model's next route; others end the request."""

    status = 502
    type = "upstream_error"
    code = "upstream_failed"

    def __init__(
        self, message: str, *, retryable: bool = False, retry_after_seconds: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        # The provider's Retry-After (429, 503): the same route may be retried after it.
        self.retry_after_seconds = retry_after_seconds


class UnreadableAnswer(UpstreamFailed):
    """The provider answered 200 with what the gateway cannot read: not JSON, nested past the
    JSON reader's depth, or not of its API's shape (gateway/providers/base.py `shaped`). Our
    failure, never the caller's, and retryable: another route may answer readably. Nothing is
    charged for it."""

    def __init__(self, message: str = "The provider's answer could not be read.") -> None:
        super().__init__(message, retryable=True)


# The last event of a stream that failed in the gateway (a bug, or a chunk it cannot write).
STREAM_FAILED = "The gateway failed to relay this stream."


class UpstreamStreamBroken(UpstreamFailed):
    """The upstream stream broke after its first byte had gone to the client: too late for a
    status code, so the client gets `stream_error_event` as the stream's last event."""

    code = "upstream_stream_failed"


class AnswerNotDelivered(GatewayError):
    """The provider answered and the request was settled, but its answer could not be written
    for the client (a provider's answer the translation cannot read; a bug). The usage stays
    charged, as the provider charged for it: the error carries the charge, and tells the SDKs
    not to retry (the retry would be charged again)."""

    status = 502
    type = "upstream_error"
    code = "answer_not_delivered"

    def __init__(self, *, cost_usd: str) -> None:
        super().__init__(
            "The provider answered, but its answer could not be passed on. The request was "
            f"charged {cost_usd} USD for the usage the provider reported (x-request-id names "
            "it); a retry is charged again."
        )
        self.cost_usd = cost_usd

    @property
    def headers(self) -> dict[str, str]:
        return {COST_HEADER: self.cost_usd, "x-should-retry": "false"}


def _error_body(error: GatewayError) -> dict[str, object]:
    return {
        "error": {
            "message": error.message,
            "type": error.type,
            "param": error.param,
            "code": error.code,
        }
    }


# The path of Anthropic's Messages API, whose callers get Anthropic's error shape.
ANTHROPIC_PATH = "/v1/messages"


def error_answer_on(error: GatewayError, *, path: str) -> JsonAnswer:
    """`error` answered outside a view (the process's capacity cap, a view that failed
    unexpectedly), under a new request id, in the shape of the API `path` belongs to:
    Anthropic's on /v1/messages, OpenAI's elsewhere."""
    answer = (
        anthropic_error_response if path.rstrip("/").endswith(ANTHROPIC_PATH) else error_response
    )
    return answer(error, request_id=new_request_id())


def stream_error_event_on(error: GatewayError, *, path: str) -> bytes:
    """`error` as the last event of a stream that failed outside its relay (gateway/asgi.py),
    in the shape of the API `path` belongs to, as error_answer_on."""
    if path.rstrip("/").endswith(ANTHROPIC_PATH):
        return anthropic_stream_error_event(error)
    return stream_error_event(error)


def error_response(error: GatewayError, *, request_id: str) -> JsonAnswer:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JsonAnswer(
        _error_body(error),
        status=error.status,
        headers={"x-request-id": request_id, **error.headers},
    )


def stream_error_event(error: GatewayError) -> bytes:
    """The same error shape as one server-sent event, to end a stream that already started.

    OpenAI's SDKs raise an APIError when a stream carries a `data:` object with `error`.
    """
    return f"data: {json.dumps(_error_body(error))}\n\n".encode()


# --- Anthropic's shape, on /v1/messages ------------------------------------------------------

# The `error.type` Anthropic's API gives each HTTP status (its "Errors" page); a status it does
# not list takes the type of its class.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def _anthropic_error_body(error: GatewayError) -> dict[str, object]:
    fallback = "invalid_request_error" if error.status < 500 else "api_error"
    return {
        "type": "error",
        "error": {"type": _ANTHROPIC_TYPES.get(error.status, fallback), "message": error.message},
    }


def anthropic_error_response(error: GatewayError, *, request_id: str) -> JsonAnswer:
    """Anthropic's error shape: {"type": "error", "error": {"type", "message"}}."""
    return JsonAnswer(
        _anthropic_error_body(error),
        status=error.status,
        headers={"x-request-id": request_id, "request-id": request_id, **error.headers},
    )


def anthropic_stream_error_event(error: GatewayError) -> bytes:
    """The same as an `error` server-sent event, to end a stream that already started."""
    return f"event: error\ndata: {json.dumps(_anthropic_error_body(error))}\n\n".encode()
