"""Gateway errors and their OpenAI-shaped responses: the one place `/v1/*` errors are written.

Services below the gateway raise domain exceptions; the view translates them here. Messages
are written for the API caller: they never carry upstream secrets, URLs or tracebacks.
"""

from __future__ import annotations

from django.http import JsonResponse


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


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


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UpstreamFailed(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_failed"


def error_response(error: GatewayError, *, request_id: str) -> JsonResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JsonResponse(
        {
            "error": {
                "message": error.message,
                "type": error.type,
                "param": error.param,
                "code": error.code,
            }
        },
        status=error.status,
        headers={"x-request-id": request_id},
    )
