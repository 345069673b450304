"""Anthropic's Messages API (`POST {base_url}/messages`) behind the OpenAI chat interface.

The translation is two pure functions, `request_to_anthropic` and `response_to_openai`, so it
can be read and tested without a network; `AnthropicAdapter` only sends what the first builds
and hands the answer to the second. Field names follow the Messages API as the official
`anthropic` SDK types it (`MessageCreateParams`, `Message`, `Usage`).

What does not translate: OpenAI sampling knobs Anthropic lacks (penalties, seed, logit_bias,
logprobs) are dropped, as other gateways do; `n` > 1 is refused, since Anthropic answers one
message per request.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Final

from gateway.errors import InvalidRequest, UpstreamStreamBroken
from gateway.providers.base import (
    TokenUsage,
    UpstreamReply,
    UpstreamStream,
    billable_usage,
    estimated_usage,
    openai_usage,
    shaped,
    token_count,
)
from gateway.providers.http import post_json
from gateway.providers.openai_request import (
    append_turn,
    assistant_content,
    content_parts,
    function_tools,
    image_url_of,
    required_max_tokens,
    split_data_url,
    text_of,
    unsupported_part,
)
from gateway.providers.sse import closer, event_data, open_event_stream
from gateway.selectors import RouteEntry

logger = logging.getLogger(__name__)

# The API version the translation is written against; Anthropic keeps a version's shapes fixed.
ANTHROPIC_VERSION: Final = "2023-06-01"

# Why the model stopped → OpenAI's finish_reason. Stops with no OpenAI equivalent are "stop":
# the answer is complete as far as the caller can act on it.
_FINISH_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# The only media types Anthropic accepts for a base64 image.
_IMAGE_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


# --- request: OpenAI chat → Anthropic Messages ---------------------------------------------


def request_to_anthropic(body: dict[str, Any], *, model: str) -> dict[str, Any]:
    """The Messages API request for an OpenAI chat completion request, for `model`.

    System (and developer) messages become the top-level `system`; tool results become user
    turns of `tool_result` blocks; consecutive turns of one role are merged into one, which is
    how Anthropic wants parallel tool results (all in the user turn after the tool calls).
    Raises InvalidRequest for what cannot be translated.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            text = text_of(message.get("content"), where=where)
            if text:
                system.append(text)
        elif role == "user":
            append_turn(turns, "user", "content", _user_blocks(message.get("content"), where=where))
        elif role == "assistant":
            append_turn(turns, "assistant", "content", _assistant_blocks(message, where=where))
        elif role == "tool":
            append_turn(turns, "user", "content", [_tool_result_block(message, where=where)])
        else:
            raise InvalidRequest(
                f"Messages with role '{role}' are not supported by this model.",
                param=f"{where}.role",
            )

    request: dict[str, Any] = {
        "model": model,
        "max_tokens": required_max_tokens(body),
        "messages": turns,
    }
    if system:
        request["system"] = "\n\n".join(system)
    _refuse_several_choices(body)
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            request[name] = body[name]
    stop = body.get("stop")
    if isinstance(stop, str):
        request["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        request["stop_sequences"] = [str(sequence) for sequence in stop]
    tools = _tools(body.get("tools"))
    if tools:
        request["tools"] = tools
        tool_choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
        if tool_choice is not None:
            request["tool_choice"] = tool_choice
    user = body.get("user")
    if isinstance(user, str) and user:
        request["metadata"] = {"user_id": user}
    output_format = _output_format(body.get("response_format"))
    if output_format is not None:
        request["output_config"] = {"format": output_format}
    return request


def _text_block(text: str) -> list[dict[str, Any]]:
    # Anthropic refuses empty text blocks.
    return [{"type": "text", "text": text}] if text else []


def _user_blocks(content: Any, *, where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for kind, part, part_where in content_parts(content, where=where):
        if kind == "text":
            blocks.extend(_text_block(str(part.get("text", ""))))
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url"), where=part_where))
        else:
            raise unsupported_part(kind, where=part_where)
    return blocks


def _image_block(image_url: Any, *, where: str) -> dict[str, Any]:
    url = image_url_of(image_url, where=where)
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    media_type, data = split_data_url(url, where=where)
    if media_type not in _IMAGE_MEDIA_TYPES:
        raise InvalidRequest(
            f"Images of type '{media_type}' are not supported by this model; use JPEG, PNG, "
            "GIF or WebP.",
            param=f"{where}.image_url",
        )
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _tools(tools: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for tool in function_tools(tools):
        definition: dict[str, Any] = {
            "name": tool.name,
            # Anthropic requires a schema; OpenAI lets a function without parameters omit it.
            "input_schema": tool.parameters or {"type": "object", "properties": {}},
        }
        if tool.description:
            definition["description"] = tool.description
        if tool.strict:
            definition["strict"] = True
        result.append(definition)
    return result


def _assistant_blocks(message: dict[str, Any], *, where: str) -> list[dict[str, Any]]:
    text, calls = assistant_content(message, where=where)
    return _text_block(text) + [
        {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
        for call in calls
    ]


def _tool_result_block(message: dict[str, Any], *, where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest("A tool message needs a 'tool_call_id'.", param=where)
    return {
        "type": "tool_result",
        "tool_use_id": call_id,
        "content": text_of(message.get("content"), where=where),
    }


def _refuse_several_choices(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise InvalidRequest("This model answers one choice per request; set 'n' to 1.", param="n")


def _tool_choice(choice: Any, parallel_tool_calls: Any) -> dict[str, Any] | None:
    if choice is None:
        translated: dict[str, Any] | None = None
    elif choice == "auto":
        translated = {"type": "auto"}
    elif choice == "none":
        return {"type": "none"}  # takes no parallelism flag: nothing will be called
    elif choice == "required":
        translated = {"type": "any"}
    elif (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and choice["function"].get("name")
    ):
        translated = {"type": "tool", "name": choice["function"]["name"]}
    else:
        raise InvalidRequest(
            "'tool_choice' must be 'auto', 'none', 'required' or a function.", param="tool_choice"
        )
    if parallel_tool_calls is False:
        translated = {**(translated or {"type": "auto"}), "disable_parallel_tool_use": True}
    return translated


def _output_format(response_format: Any) -> dict[str, Any] | None:
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        # "text" is the default; "json_object" has no Anthropic equivalent, and OpenAI already
        # requires the prompt itself to ask for JSON, so the model is told either way.
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequest(
            "'response_format.json_schema.schema' is required.", param="response_format"
        )
    return {"type": "json_schema", "schema": schema}


# --- response: Anthropic Message → OpenAI chat.completion ----------------------------------


def response_to_openai(message: Any, *, request: dict[str, Any], created: int) -> UpstreamReply:
    """The OpenAI chat.completion for an Anthropic `Message`, and the usage to bill.

    Text blocks are joined into `content`; `tool_use` blocks become `tool_calls` with
    JSON-encoded arguments. Anthropic's `input_tokens` counts only the uncached part of the
    prompt, so the prompt total adds the tokens read from and written to the cache; the tokens
    read are billed at the cached price. Raises UnreadableAnswer when the answer is not a
    Message (`shaped`: each value read must be of the type the API documents).
    """
    message = shaped(message, dict)
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in shaped(message.get("content"), list):
        block = shaped(block, dict)
        kind = shaped(block.get("type"), str)
        if kind == "text":
            texts.append(shaped(block.get("text"), str))
        elif kind == "tool_use":
            call_id, name = _tool_use(block)
            arguments = shaped(block.get("input"), dict, default={})
            tool_calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": json.dumps(arguments, ensure_ascii=False),
                    },
                }
            )
        # Other blocks (thinking, server tools) are never asked for by this adapter.
    reply_message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if tool_calls:
        reply_message["tool_calls"] = tool_calls
    usage = _usage(message.get("usage"), request=request, completion="".join(texts))
    upstream_id = message.get("id")
    choice: dict[str, Any] = {
        "index": 0,
        "message": reply_message,
        "finish_reason": _FINISH_REASONS.get(str(message.get("stop_reason")), "stop"),
        "logprobs": None,
    }
    choice.update(_matched_stop(message))
    body = {
        "id": f"chatcmpl-{upstream_id}" if upstream_id else f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [choice],
        "usage": openai_usage(usage),
    }
    return UpstreamReply(body=body, usage=usage)


def _tool_use(block: dict[str, Any]) -> tuple[str, str]:
    """The id and name of a `tool_use` block, whole or as a stream's content_block_start."""
    return shaped(block.get("id"), str), shaped(block.get("name"), str)


def _matched_stop(message: dict[str, Any]) -> dict[str, Any]:
    """`stop_reason`: the stop sequence that ended the answer, as vLLM reports it in a choice
    (OpenAI has no field for it), so /v1/messages can answer `stop_sequence` faithfully."""
    sequence = message.get("stop_sequence")
    if message.get("stop_reason") == "stop_sequence" and isinstance(sequence, str):
        return {"stop_reason": sequence}
    return {}


def _usage(usage: Any, *, request: dict[str, Any], completion: str) -> TokenUsage:
    reported = _reported_usage(usage)
    if reported is None:
        # Anthropic always reports usage; should it not, the answer is still charged.
        return estimated_usage(prompt=request.get("messages", []), completion=completion)
    return reported


def _reported_usage(usage: Any) -> TokenUsage | None:
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int):
        return None
    uncached = token_count(usage["input_tokens"])
    # The cache fields are absent or null when no cache was involved.
    cache_read = token_count(usage.get("cache_read_input_tokens"))
    cache_write = token_count(usage.get("cache_creation_input_tokens"))
    if uncached is None or cache_read is None or cache_write is None:
        return None
    return billable_usage(
        input_tokens=uncached + cache_read + cache_write,
        output_tokens=token_count(usage.get("output_tokens")),
        cached_input_tokens=cache_read,
        cache_write_input_tokens=cache_write,
    )


class AnthropicAdapter:
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST the translated request to `{base_url}/messages` and translate the answer back."""
        request = request_to_anthropic(body, model=route.upstream_model)
        reply = await post_json(
            route=route, url=f"{route.base_url}/messages", payload=request, headers=_headers(secret)
        )
        return response_to_openai(reply, request=request, created=int(time.time()))

    async def chat_completion_stream(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamStream:
        """POST the translated request with `stream: true` to `{base_url}/messages` and open
        its event stream, translated to OpenAI chunks by `stream_to_openai`."""
        request = {**request_to_anthropic(body, model=route.upstream_model), "stream": True}
        response = await open_event_stream(
            route=route,
            url=f"{route.base_url}/messages",
            payload=request,
            headers=_headers(secret),
        )
        chunks = stream_to_openai(event_data(route, response), created=int(time.time()))
        return UpstreamStream(chunks=chunks, close=closer(response))


def _headers(secret: str) -> dict[str, str]:
    headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
    if secret:
        headers["x-api-key"] = secret
    return headers


# --- stream: Anthropic Messages events → OpenAI chat.completion.chunk ----------------------


async def stream_to_openai(
    events: AsyncIterator[Any], *, created: int
) -> AsyncIterator[dict[str, Any]]:
    """OpenAI chunks for the Messages API's stream events, ending with the usage chunk.

    `message_start` opens the assistant turn; `text_delta`s become `content`, a `tool_use`
    block becomes a tool call (id and name first, then its `input_json_delta`s as
    `arguments`); `message_delta` gives the finish reason. Usage is `message_start`'s, updated
    by `message_delta`'s (cumulative) figures, and goes out as the last chunk once
    `message_stop` arrives. An `error` event, or a stream that ends before `message_stop`,
    raises UpstreamStreamBroken; an event not of the API's shape, UnreadableAnswer (`shaped`),
    which ends the stream as a break does (gateway/streaming.py).
    """
    base: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": None,
    }
    usage: dict[str, Any] = {}
    tool_indexes: dict[int, int] = {}  # Anthropic content block index → OpenAI tool call index

    def chunk(delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None, **extra}]}

    async for event in events:
        event = shaped(event, dict)
        kind = shaped(event.get("type"), str)
        if kind == "message_start":
            message = shaped(event.get("message"), dict)
            if message.get("id"):
                base["id"] = f"chatcmpl-{message['id']}"
            base["model"] = message.get("model")
            usage.update(shaped(message.get("usage"), dict, default={}))
            yield chunk({"role": "assistant", "content": ""})
        elif kind == "content_block_start":
            block = shaped(event.get("content_block"), dict)
            block_kind = shaped(block.get("type"), str)
            if block_kind == "tool_use":
                call_id, name = _tool_use(block)
                index = tool_indexes[shaped(event.get("index"), int)] = len(tool_indexes)
                call = {
                    "index": index,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": ""},
                }
                yield chunk({"tool_calls": [call]})
            elif block_kind == "text":
                text = shaped(block.get("text"), str, default="")
                if text:
                    yield chunk({"content": text})
        elif kind == "content_block_delta":
            delta = shaped(event.get("delta"), dict)
            delta_kind = shaped(delta.get("type"), str)
            if delta_kind == "text_delta":
                yield chunk({"content": shaped(delta.get("text"), str)})
            elif delta_kind == "input_json_delta":
                block_index = shaped(event.get("index"), int)
                if block_index in tool_indexes:
                    arguments = {"arguments": shaped(delta.get("partial_json"), str)}
                    call = {"index": tool_indexes[block_index], "function": arguments}
                    yield chunk({"tool_calls": [call]})
            # thinking and signature deltas: never asked for by this adapter
        elif kind == "message_delta":
            reported = shaped(event.get("usage"), dict, default={})
            usage.update({k: v for k, v in reported.items() if v is not None})
            stop = shaped(event.get("delta"), dict, default={})
            finish = chunk({}, **_matched_stop(stop))
            finish["choices"][0]["finish_reason"] = _FINISH_REASONS.get(
                str(stop.get("stop_reason")), "stop"
            )
            yield finish
        elif kind == "message_stop":
            reported_usage = _reported_usage(usage)
            if reported_usage is not None:
                yield {**base, "choices": [], "usage": openai_usage(reported_usage)}
            return
        elif kind == "error":
            # The provider's own words may name internals: the client gets ours.
            error = event.get("error")
            logger.warning(
                "anthropic stream error event: %s",
                error.get("type") if isinstance(error, dict) else None,
            )
            raise UpstreamStreamBroken("The provider failed in the middle of the stream.")
        # ping, and event types added later: nothing to relay
    raise UpstreamStreamBroken("The provider's stream broke off.")
