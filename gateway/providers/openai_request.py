"""Reading an OpenAI chat request, for the adapters that translate it to another format.

The checks and the error messages a client gets for a malformed request are the same whatever
the provider behind the model, so they live here once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest


def text_of(content: Any, *, where: str) -> str:
    """The text of a message whose content may only be text (system, developer, tool)."""
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


def content_parts(content: Any, *, where: str) -> list[tuple[str, dict[str, Any], str]]:
    """A user message's parts as (type, part, where) triples; a string is one text part."""
    if isinstance(content, str):
        return [("text", {"type": "text", "text": content}, where)]
    if not isinstance(content, list):
        raise InvalidRequest("'content' must be a string or a list of parts.", param=where)
    return [
        (
            str(part.get("type")) if isinstance(part, dict) else "",
            part if isinstance(part, dict) else {},
            f"{where}.content[{number}]",
        )
        for number, part in enumerate(content)
    ]


def unsupported_part(kind: str, *, where: str) -> InvalidRequest:
    return InvalidRequest(
        f"Content parts of type '{kind}' are not supported by this model.", param=where
    )


def image_url_of(image_url: Any, *, where: str) -> str:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise InvalidRequest("'image_url.url' is required.", param=where)
    return url


def split_data_url(url: str, *, where: str) -> tuple[str, str]:
    """(media type, base64 data) of a `data:<type>;base64,<data>` image URL."""
    header, comma, data = url.partition(",")
    if not (url.startswith("data:") and header.endswith(";base64") and comma and data):
        raise InvalidRequest(
            "An image must be an http(s) URL or a base64 data URL.", param=f"{where}.image_url"
        )
    return header.removeprefix("data:").removesuffix(";base64"), data


def tool_arguments(arguments: Any, *, where: str) -> dict[str, Any]:
    """A tool call's JSON-encoded arguments as the object other providers want."""
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


def required_max_tokens(body: dict[str, Any]) -> int:
    """The completion limit, which the gateway has always set (metering.cap_max_tokens)."""
    # The newer name wins when both are present: it is the one the cap was applied to.
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)
        return value
    raise InvalidRequest("'max_tokens' is required by this model.", param="max_tokens")


@dataclass(frozen=True, slots=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any] | None  # JSON Schema, as the client wrote it
    strict: bool


def function_tools(tools: Any) -> list[FunctionTool]:
    """The request's tools, each checked to be a named function."""
    result = []
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
        result.append(
            FunctionTool(
                name=name,
                description=function.get("description") or None,
                parameters=function.get("parameters") or None,
                strict=function.get("strict") is True,
            )
        )
    return result


@dataclass(frozen=True, slots=True)
class RequestedToolCall:
    """A tool call an earlier assistant message made, as the client sends it back."""

    id: str
    name: str
    arguments: dict[str, Any]


def assistant_content(
    message: dict[str, Any], *, where: str
) -> tuple[str, list[RequestedToolCall]]:
    """An assistant message's text and its tool calls, each checked."""
    content = message.get("content")
    if isinstance(content, list):
        # An assistant's parts are text or refusal; a refusal is what the model said.
        text = "".join(
            str(part.get("text") or part.get("refusal") or "")
            for part in content
            if isinstance(part, dict)
        )
    else:
        text = text_of(content, where=where)
    calls = []
    tool_calls = message.get("tool_calls")
    for number, call in enumerate(tool_calls if isinstance(tool_calls, list) else []):
        call_where = f"{where}.tool_calls[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not call.get("id") or not function.get("name"):
            raise InvalidRequest(
                "A tool call needs an 'id' and a 'function' with a 'name'.", param=call_where
            )
        calls.append(
            RequestedToolCall(
                id=str(call["id"]),
                name=str(function["name"]),
                arguments=tool_arguments(function.get("arguments"), where=call_where),
            )
        )
    return text, calls


def append_turn(turns: list[dict[str, Any]], role: str, key: str, items: list[Any]) -> None:
    """Add items to the conversation, merging with the last turn when it has the same role.

    Both Anthropic and Gemini refuse empty turns and want consecutive same-role turns merged
    (tool results after several tool calls, for instance).
    """
    if not items:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][key].extend(items)
    else:
        turns.append({"role": role, key: items})
