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
import time
import uuid
from typing import Any, Final

from gateway.errors import InvalidRequest, UpstreamFailed
from gateway.providers.base import TokenUsage, UpstreamReply, estimated_usage
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
from gateway.selectors import RouteEntry

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
    read are billed at the cached price. Raises UpstreamFailed when the answer is not a Message.
    """
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        raise UpstreamFailed("The provider's answer was not a chat completion.")
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            tool_calls.append(
                {
                    "id": str(block.get("id")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name")),
                        "arguments": json.dumps(block.get("input") or {}, ensure_ascii=False),
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
    body = {
        "id": f"chatcmpl-{upstream_id}" if upstream_id else f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created,
        "model": message.get("model"),
        "choices": [
            {
                "index": 0,
                "message": reply_message,
                "finish_reason": _FINISH_REASONS.get(str(message.get("stop_reason")), "stop"),
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        },
    }
    return UpstreamReply(body=body, usage=usage)


def _usage(usage: Any, *, request: dict[str, Any], completion: str) -> TokenUsage:
    if not isinstance(usage, dict) or not isinstance(usage.get("input_tokens"), int):
        # Anthropic always reports usage; should it not, the answer is still charged.
        return estimated_usage(prompt=request.get("messages", []), completion=completion)
    # The cache fields are absent or null when no cache was involved.
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_write = int(usage.get("cache_creation_input_tokens") or 0)
    return TokenUsage(
        input_tokens=usage["input_tokens"] + cache_read + cache_write,
        output_tokens=int(usage.get("output_tokens") or 0),
        cached_input_tokens=cache_read,
        cache_write_input_tokens=cache_write,
    )


class AnthropicAdapter:
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST the translated request to `{base_url}/messages` and translate the answer back."""
        request = request_to_anthropic(body, model=route.upstream_model)
        headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        if secret:
            headers["x-api-key"] = secret
        reply = await post_json(
            route=route, url=f"{route.base_url}/messages", payload=request, headers=headers
        )
        return response_to_openai(reply, request=request, created=int(time.time()))
