"""Step 2 of the request path: read and check the client's request body."""

from __future__ import annotations

from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import RequestDataTooBig

from gateway.errors import InvalidRequest, RequestTooLarge
from gateway.wire import GatewayRequest

# Fields that would let a caller point the gateway at another server or credential. Refused at
# any depth: the route, never the request, decides where a call goes.
PROVIDER_ADDRESSING_FIELDS = frozenset(
    {"base_url", "api_base", "api_key", "api_version", "azure_endpoint", "custom_llm_provider"}
)
_UTF8_BOM = b"\xef\xbb\xbf"
# How deeply a body may nest arrays and objects. orjson reads up to 1024 levels, but the
# gateway's encoders and translations recurse, and Python's recursion stops near 1000: a
# body nested that deep got a 500. No API field needs more than a few dozen.
MAX_JSON_DEPTH = 256


def read_json_body(request: GatewayRequest) -> dict[str, Any]:
    """The body as a JSON object, within the size cap; raises a 4xx GatewayError otherwise."""
    declared = request.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > settings.GATEWAY_MAX_BODY_BYTES:
        raise RequestTooLarge(_too_large_message())
    try:
        raw = request.body
    except RequestDataTooBig:
        raise RequestTooLarge(_too_large_message()) from None
    if raw.startswith(_UTF8_BOM):  # RFC 8259 lets a parser ignore it; some clients send it
        raw = raw[len(_UTF8_BOM) :]
    try:
        # orjson reads JSON as RFC 8259 has it, where Python's json also takes NaN, Infinity
        # and lone surrogates (which UTF-8 cannot carry on to the provider); and 3x faster.
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    _refuse_provider_addressing(body)
    return body


def _too_large_message() -> str:
    return f"The request body exceeds {settings.GATEWAY_MAX_BODY_BYTES} bytes."


def _refuse_provider_addressing(body: dict[str, Any]) -> None:
    """Refuse a provider-addressing field at any depth, and a body nested deeper than
    MAX_JSON_DEPTH; walked with a stack of its own, not by recursion."""
    pending: list[tuple[Any, str, int]] = [(body, "", 1)]
    while pending:
        value, path, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(
                f"The request body is nested more than {MAX_JSON_DEPTH} levels deep."
            )
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if key in PROVIDER_ADDRESSING_FIELDS:
                    raise InvalidRequest(
                        f"'{where}' is not accepted: the gateway chooses the provider.",
                        param=where,
                    )
                pending.append((item, where, depth + 1))
        elif isinstance(value, list):
            pending.extend(
                (item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value)
            )


def chat_request(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check a chat completion body; returns the model name and the body."""
    model = _model_of(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty list.", param="messages")
    if not all(isinstance(message, dict) and "role" in message for message in messages):
        raise InvalidRequest("Each message must be an object with a 'role'.", param="messages")
    _check_stream_fields(body)
    _check_positive_ints(body, "n")
    return model, body


def _is_token_array(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(token, int) and not isinstance(token, bool) for token in value)
    )


def _is_prompt(value: Any) -> bool:
    """A string, a token array, or a non-empty list of either (OpenAI's `prompt`/`input`)."""
    if isinstance(value, str) or _is_token_array(value):
        return True
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, str) or _is_token_array(item) for item in value)
    )


def _model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required (a string).", param="model")
    return model


def _check_stream_fields(body: dict[str, Any]) -> None:
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise InvalidRequest("'stream' must be true or false.", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")


def _check_positive_ints(body: dict[str, Any], *names: str) -> None:
    for name in names:
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)


def completion_request(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check a legacy completion body (`/v1/completions`); returns the model name and the body."""
    model = _model_of(body)
    if not _is_prompt(body.get("prompt")):
        raise InvalidRequest(
            "'prompt' must be a string, an array of tokens, or a non-empty array of either.",
            param="prompt",
        )
    if body.get("max_completion_tokens") is not None:
        # Not a field of this API: providers ignore it and generate up to their default, past
        # the limit the gateway would reserve from it.
        raise InvalidRequest(
            "'max_completion_tokens' is not a legacy completions field; use 'max_tokens'.",
            param="max_completion_tokens",
        )
    _check_stream_fields(body)
    _check_positive_ints(body, "n", "best_of")
    return model, body


EMBEDDING_ENCODINGS = frozenset({"float", "base64"})


def embedding_request(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Check an embeddings body (`/v1/embeddings`); returns the model name and the body."""
    model = _model_of(body)
    given = body.get("input")
    if not _is_prompt(given) or given == "" or (isinstance(given, list) and "" in given):
        raise InvalidRequest(
            "'input' must be a non-empty string, an array of tokens, or a non-empty array of "
            "either.",
            param="input",
        )
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in EMBEDDING_ENCODINGS:
        raise InvalidRequest(
            "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
        )
    _check_positive_ints(body, "dimensions")
    if body.get("stream"):
        raise InvalidRequest("Embeddings are not streamed.", param="stream")
    return model, body
