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
from gateway.providers.base import TokenUsage, UpstreamReply, estimate_tokens
from gateway.providers.http import post_json
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
            text = _text_of(message.get("content"), where=where)
            if text:
                system.append(text)
        elif role == "user":
            _append_turn(turns, "user", _user_blocks(message.get("content"), where=where))
        elif role == "assistant":
            _append_turn(turns, "assistant", _assistant_blocks(message, where=where))
        elif role == "tool":
            _append_turn(turns, "user", [_tool_result_block(message, where=where)])
        else:
            raise InvalidRequest(
                f"Messages with role '{role}' are not supported by this model.",
                param=f"{where}.role",
            )

    request: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(body), "messages": turns}
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


def _append_turn(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    if not blocks:
        return  # Anthropic refuses empty turns; an empty message says nothing anyway
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _text_of(content: Any, *, where: str) -> str:
    """The text of a message whose content may only be text (system, tool)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(
                    "Only text parts are accepted here.", param=f"{where}.content[{number}]"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise InvalidRequest("'content' must be a string or a list of parts.", param=where)


def _text_block(text: str) -> list[dict[str, Any]]:
    # Anthropic refuses empty text blocks.
    return [{"type": "text", "text": text}] if text else []


def _user_blocks(content: Any, *, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return _text_block(content)
    if not isinstance(content, list):
        raise InvalidRequest("'content' must be a string or a list of parts.", param=where)
    blocks: list[dict[str, Any]] = []
    for number, part in enumerate(content):
        part_where = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.extend(_text_block(str(part.get("text", ""))))
        elif kind == "image_url":
            blocks.append(_image_block(part.get("image_url"), where=part_where))
        else:
            raise InvalidRequest(
                f"Content parts of type '{kind}' are not supported by this model.",
                param=part_where,
            )
    return blocks


def _image_block(image_url: Any, *, where: str) -> dict[str, Any]:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise InvalidRequest("'image_url.url' is required.", param=where)
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    header, comma, data = url.partition(",")
    media_type = header.removeprefix("data:").removesuffix(";base64")
    if not (url.startswith("data:") and header.endswith(";base64") and comma and data):
        raise InvalidRequest(
            "An image must be an http(s) URL or a base64 data URL.", param=f"{where}.image_url"
        )
    if media_type not in _IMAGE_MEDIA_TYPES:
        raise InvalidRequest(
            f"Images of type '{media_type}' are not supported by this model; use JPEG, PNG, "
            "GIF or WebP.",
            param=f"{where}.image_url",
        )
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _assistant_blocks(message: dict[str, Any], *, where: str) -> list[dict[str, Any]]:
    content = message.get("content")
    blocks: list[dict[str, Any]] = []
    if isinstance(content, list):
        # An assistant's parts are text or refusal; a refusal is what the model said.
        for part in content:
            if isinstance(part, dict):
                blocks.extend(_text_block(str(part.get("text") or part.get("refusal") or "")))
    else:
        blocks.extend(_text_block(_text_of(content, where=where)))
    tool_calls = message.get("tool_calls")
    for number, call in enumerate(tool_calls if isinstance(tool_calls, list) else []):
        call_where = f"{where}.tool_calls[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not call.get("id") or not function.get("name"):
            raise InvalidRequest(
                "A tool call needs an 'id' and a 'function' with a 'name'.", param=call_where
            )
        blocks.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": function["name"],
                "input": _arguments(function.get("arguments"), where=call_where),
            }
        )
    return blocks


def _arguments(arguments: Any, *, where: str) -> dict[str, Any]:
    """A tool call's JSON-encoded arguments as the object Anthropic wants."""
    if arguments is None or arguments == "":
        return {}
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest(
            "A tool call's 'arguments' must be a JSON object.", param=f"{where}.function.arguments"
        )
    return value


def _tool_result_block(message: dict[str, Any], *, where: str) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest("A tool message needs a 'tool_call_id'.", param=where)
    return {
        "type": "tool_result",
        "tool_use_id": call_id,
        "content": _text_of(message.get("content"), where=where),
    }


def _max_tokens(body: dict[str, Any]) -> int:
    # The gateway has capped whichever field the client used; the newer name wins when both are
    # present because that is the one the cap was applied to.
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
        return value
    raise InvalidRequest("'max_tokens' is required by this model.", param="max_tokens")


def _refuse_several_choices(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise InvalidRequest("This model answers one choice per request; set 'n' to 1.", param="n")


def _tools(tools: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for number, tool in enumerate(tools if isinstance(tools, list) else []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise InvalidRequest(
                "Only tools of type 'function' are supported by this model.",
                param=f"tools[{number}]",
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest("A function needs a 'name'.", param=f"tools[{number}]")
        definition: dict[str, Any] = {
            "name": name,
            # Anthropic requires a schema; OpenAI lets a function without parameters omit it.
            "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
        }
        if function.get("description"):
            definition["description"] = function["description"]
        if function.get("strict") is True:
            definition["strict"] = True
        result.append(definition)
    return result


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
        return TokenUsage(
            input_tokens=estimate_tokens(json.dumps(request.get("messages", []))),
            output_tokens=estimate_tokens(completion),
            reported=False,
        )
    # The cache fields are absent or null when no cache was involved.
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_write = int(usage.get("cache_creation_input_tokens") or 0)
    return TokenUsage(
        input_tokens=usage["input_tokens"] + cache_read + cache_write,
        output_tokens=int(usage.get("output_tokens") or 0),
        cached_input_tokens=cache_read,
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
