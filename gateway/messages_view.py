"""`POST /v1/messages`: Anthropic's Messages API in front of the chat completions pipeline.

Reads as the request path's steps 1 and 2; steps 2 (model) to 7 are the chat pipeline's own
(`serve_chat`), with answers and errors written in Anthropic's shapes (gateway/messages.py,
gateway/errors.py).
"""

from __future__ import annotations

import time

from gateway.auth import authenticate, bearer_token, client_host_of
from gateway.errors import UnknownEndpoint, anthropic_error_response
from gateway.messages import message_events, message_from_openai, request_to_openai
from gateway.requests import chat_request, read_json_body
from gateway.views import ReplyFormat, _openai_endpoint, serve_chat
from gateway.wire import Answer, GatewayRequest

ANTHROPIC_REPLY = ReplyFormat(whole=message_from_openai, stream=message_events)


def _api_key(request: GatewayRequest) -> str:
    """Anthropic's SDKs send the key as `x-api-key`; some tools send a bearer token."""
    return request.headers.get("x-api-key", "").strip() or bearer_token(
        request.headers.get("Authorization", "")
    )


@_openai_endpoint("POST", anthropic_error_response)
async def messages(request: GatewayRequest, request_id: str) -> Answer:
    """POST /v1/messages, answered with a `message` or, with `"stream": true`, its events."""
    started = time.monotonic()
    # 1. Key
    caller = await authenticate(_api_key(request), client_host=client_host_of(request))
    # 2. Request, translated to the chat pipeline's
    model_name, body = chat_request(request_to_openai(read_json_body(request)))
    answer = await serve_chat(
        request,
        request_id,
        caller=caller,
        model_name=model_name,
        body=body,
        started=started,
        reply_format=ANTHROPIC_REPLY,
    )
    answer["request-id"] = request_id  # Anthropic's own header, which its SDKs read (errors too)
    return answer


@_openai_endpoint(None, anthropic_error_response)
async def unknown_endpoint(request: GatewayRequest, request_id: str) -> Answer:
    """A path under /v1/messages/ (count_tokens, batches, …): a 404 in Anthropic's shape,
    which the SDKs that call them read."""
    raise UnknownEndpoint(f"Unknown endpoint: {request.method} {request.path}")
