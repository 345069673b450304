"""OpenAI-compatible providers (OpenAI, Mistral, Groq, vLLM, Ollama, …): the body passes as is."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import aiohttp

from gateway.errors import UnreadableAnswer, UpstreamStreamBroken
from gateway.providers.base import (
    TokenUsage,
    UpstreamReply,
    UpstreamStream,
    billable_usage,
    content_text,
    estimated_usage,
    readable_content,
    reported_usage,
    shaped,
    token_count,
)
from gateway.providers.http import post_json
from gateway.providers.sse import closer, event_data, open_event_stream
from gateway.selectors import RouteEntry

logger = logging.getLogger(__name__)


def _usage_from(body: dict[str, Any], request: dict[str, Any]) -> TokenUsage:
    usage = reported_usage(body.get("usage"))
    if usage is not None:
        return usage
    completion = "".join(
        content_text((choice.get("message") or {}).get("content"), thinking=True)
        for choice in body.get("choices", [])
    )
    return estimated_usage(prompt=request.get("messages", []), completion=completion)


def _completion_usage_from(body: dict[str, Any], request: dict[str, Any]) -> TokenUsage:
    usage = reported_usage(body.get("usage"))
    if usage is not None:
        return usage
    completion = "".join(
        str(choice.get("text") or "")
        for choice in body.get("choices", [])
        if isinstance(choice, dict)
    )
    return estimated_usage(prompt=request.get("prompt", ""), completion=completion)


def _embedding_usage_from(body: dict[str, Any], request: dict[str, Any]) -> TokenUsage:
    usage = body.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        reported = billable_usage(input_tokens=token_count(usage["prompt_tokens"]), output_tokens=0)
        if reported is not None:
            return reported
    estimate = estimated_usage(prompt=request.get("input", ""), completion="")
    return TokenUsage(input_tokens=estimate.input_tokens, output_tokens=0, reported=False)


def _with_usage_chunk(body: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """The streamed request: always asks for the usage chunk, whatever the client asked, as
    it is what the request is charged from."""
    stream_options = body.get("stream_options")
    return {
        **body,
        "model": upstream_model,
        "stream": True,
        "stream_options": {
            **(stream_options if isinstance(stream_options, dict) else {}),
            "include_usage": True,
        },
    }


def _headers(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"} if secret else {}


async def _chunks(
    route: RouteEntry, response: aiohttp.ClientResponse
) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a chat completion's server-sent events, up to `[DONE]`, with their
    bytes (gateway/providers/sse.py EventObject): a chunk the relay leaves as it is goes to
    the client as the provider wrote it. A chunk whose `choices` is not a list of objects,
    each with an object (or nothing) as its `delta` whose fields are of their types
    (`content` as `readable_content` takes it; text or null `finish_reason` and a legacy
    completion's `text`; `tool_calls` as `_readable_tool_calls` reads them), is one no client
    could read: UnreadableAnswer, which ends the stream as a break does. This runs per frame:
    a few isinstance checks on the keys a chunk has, a call only for the rare chunk carrying
    tool calls."""
    async for chunk in event_data(route, response, keep_bytes=True):
        if not isinstance(chunk, dict) or "error" in chunk:
            # An error reported inside the stream: its text is the provider's, not ours to
            # pass on (it may name internals), so the client gets our own message.
            logger.warning("provider %s reported an error mid-stream", route.provider)
            raise UpstreamStreamBroken("The provider failed in the middle of the stream.")
        for choice in shaped(chunk.get("choices"), list, default=_NO_CHOICES):
            delta = shaped(shaped(choice, dict).get("delta"), dict, default=_NO_DELTA)
            calls = delta.get("tool_calls")
            if not (
                readable_content(delta.get("content"))
                and isinstance(choice.get("finish_reason"), _TEXT_OR_NULL)
                and isinstance(choice.get("text"), _TEXT_OR_NULL)
                and (calls is None or _readable_tool_calls(calls, streamed=True))
            ):
                raise UnreadableAnswer()
        yield chunk


# What a chunk without choices (some usage chunks), or a choice without a delta (a legacy
# completion's), is read as; never changed.
_NO_CHOICES: Final[list[Any]] = []
_NO_DELTA: Final[dict[str, Any]] = {}
_TEXT_OR_NULL: Final = (str, type(None))


def _readable_tool_calls(calls: Any, *, streamed: bool) -> bool:
    """Whether `calls` are a message's `tool_calls` as the SDKs and gateway/messages.py read
    them: a list of objects, each with a text (or null) `id` and a `function` object with a
    text `name` and `arguments`; a tool call of another `type` (`custom`) has no `function`.
    Streamed (a delta's), they come in pieces: `function`, its `name` and `arguments` may be
    absent or null, and the `index` is an integer (absent from some providers' pieces)."""
    if not isinstance(calls, list):
        return False
    kinds: type | tuple[type, ...] = _TEXT_OR_NULL if streamed else str
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("id"), _TEXT_OR_NULL):
            return False
        function = call.get("function")
        if streamed:
            index = call.get("index")
            if isinstance(index, bool) or not isinstance(index, (int, type(None))):
                return False
            if function is None:
                continue
        elif function is None and call.get("type", "function") != "function":
            continue
        if not (
            isinstance(function, dict)
            and isinstance(function.get("name"), kinds)
            and isinstance(function.get("arguments"), kinds)
        ):
            return False
    return True


def _readable_chat_choice(choice: dict[str, Any]) -> bool:
    """Whether a chat completion's choice holds what the SDKs and gateway/messages.py read:
    a `message` object whose `content` is readable (`readable_content`: text, null, or
    Mistral's list of parts), whose `refusal` is text or null and whose `tool_calls` are
    readable (or absent), and a text (or null) `finish_reason`."""
    message = choice.get("message")
    if not isinstance(message, dict):
        return False
    calls = message.get("tool_calls")
    return (
        readable_content(message.get("content"))
        and isinstance(message.get("refusal"), _TEXT_OR_NULL)
        and isinstance(choice.get("finish_reason"), _TEXT_OR_NULL)
        and (calls is None or _readable_tool_calls(calls, streamed=False))
    )


def _readable_completion_choice(choice: dict[str, Any]) -> bool:
    # A legacy completion's text is always a string, empty when nothing was generated.
    return isinstance(choice.get("text"), str)


def _readable_embedding(item: dict[str, Any]) -> bool:
    # A list of floats, or base64 text with `encoding_format: base64`; never looked inside.
    return isinstance(item.get("embedding"), (list, str))


@dataclass(frozen=True, slots=True)
class _Shape:
    """What an answer must hold to be read: a list at `list_field` of objects, each of which
    `readable` accepts; `name` is for the error."""

    list_field: str
    name: str
    readable: Callable[[dict[str, Any]], bool]


_CHAT: Final = _Shape("choices", "a chat completion", _readable_chat_choice)
_COMPLETION: Final = _Shape("choices", "a completion", _readable_completion_choice)
_EMBEDDINGS: Final = _Shape("data", "a list of embeddings", _readable_embedding)


def _check_shape(reply: Any, shape: _Shape) -> dict[str, Any]:
    """`reply` when it has `shape`; UnreadableAnswer otherwise. The items are the choices (one
    unless `n` asked for more) or the embeddings of a batch: a few isinstance checks each on
    the fields a reader (the SDKs, gateway/messages.py) touches, never a look inside a vector
    or a text. Run before the answer is measured and charged, so that one the client could
    not use fails over instead."""
    items = reply.get(shape.list_field) if isinstance(reply, dict) else None
    if not isinstance(items, list):
        raise UnreadableAnswer(f"The provider's answer was not {shape.name}.")
    readable = shape.readable
    for item in items:
        if not isinstance(item, dict) or not readable(item):
            raise UnreadableAnswer(f"The provider's answer was not {shape.name}.")
    return reply


class OpenAIAdapter:
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST the body to `{base_url}/chat/completions` with the route's upstream model."""
        return await _post(route, "/chat/completions", body, secret, _CHAT, usage=_usage_from)

    async def chat_completion_stream(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamStream:
        """POST the body with `stream: true` and open its event stream.

        Always asks for the usage chunk (`stream_options.include_usage`). Errors before the
        stream starts are decided as for `chat_completion` (gateway/providers/http.py
        explains which is which).
        """
        return await _open_stream(
            route, "/chat/completions", _with_usage_chunk(body, route.upstream_model), secret
        )

    async def completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST a legacy completion to `{base_url}/completions` with the upstream model."""
        return await _post(
            route, "/completions", body, secret, _COMPLETION, usage=_completion_usage_from
        )

    async def completion_stream(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamStream:
        """Stream a legacy completion, asking for the usage chunk as a chat stream does."""
        return await _open_stream(
            route, "/completions", _with_usage_chunk(body, route.upstream_model), secret
        )

    async def embeddings(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST to `{base_url}/embeddings`; `input`, `dimensions` and `encoding_format` pass
        as the client sent them, so a base64 answer stays base64."""
        return await _post(
            route, "/embeddings", body, secret, _EMBEDDINGS, usage=_embedding_usage_from
        )


async def _post(
    route: RouteEntry,
    path: str,
    body: dict[str, Any],
    secret: str,
    shape: _Shape,
    *,
    usage: Callable[[dict[str, Any], dict[str, Any]], TokenUsage],
) -> UpstreamReply:
    """POST the body, with the route's upstream model, to `{base_url}{path}`; the answer must
    have the `shape` expected, and `usage(answer, request)` measures it."""
    request = {**body, "model": route.upstream_model}
    reply = await post_json(
        route=route, url=f"{route.base_url}{path}", payload=request, headers=_headers(secret)
    )
    reply = _check_shape(reply, shape)
    return UpstreamReply(body=reply, usage=usage(reply, request))


async def _open_stream(
    route: RouteEntry, path: str, request: dict[str, Any], secret: str
) -> UpstreamStream:
    """POST a streamed request and return once the provider answered 200, its events unread."""
    response = await open_event_stream(
        route=route, url=f"{route.base_url}{path}", payload=request, headers=_headers(secret)
    )
    return UpstreamStream(chunks=_chunks(route, response), close=closer(response))
