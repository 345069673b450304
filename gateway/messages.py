"""Anthropic's Messages API as an inbound format: `POST /v1/messages` for any catalog model.

The endpoint runs the chat completions pipeline (gateway/views.py `serve_chat`); this module
only translates at its two edges, as three pure parts that can be read and tested apart:
- `request_to_openai`: a Messages request → the internal OpenAI-shaped chat request;
- `message_from_openai`: the pipeline's chat.completion (and the usage billed) → a `message`;
- `MessageEvents`: the pipeline's stream events (gateway/streaming.py `StreamEvent`: OpenAI
  chunk objects, the charge, the end) → the Messages streaming events
  (message_start, ping, content_block_start/delta/stop, message_delta, message_stop, or an
  `error` event when the upstream broke off after the first byte).
Field names follow the API as the official `anthropic` SDK types it (`MessageCreateParams`,
`Message`, `RawMessageStreamEvent`).

What does not translate: `top_k`, `thinking`, `service_tier` and cache_control markers are
dropped (no OpenAI equivalent; the route's provider caches on its own); server tools (web
search, code execution, …) and document blocks are refused with a 400.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

from gateway.errors import GatewayError, InvalidRequest, anthropic_stream_error_event
from gateway.providers.base import TokenUsage, content_text, estimate_tokens, reported_usage
from gateway.streaming import Charge, StreamEnd, StreamEvent, close_events, cost_comment

# OpenAI finish_reason → Anthropic stop_reason.
_STOP_REASONS: Final = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# Sampling and bookkeeping fields that pass under another name or the same one.
_PASSED: Final = {"temperature": "temperature", "top_p": "top_p", "stop_sequences": "stop"}


# --- request: Anthropic Messages → OpenAI chat ---------------------------------------------


def request_to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI chat request for a Messages API request.

    `system` becomes the first message; a user turn's `tool_result` blocks become `tool`
    messages (before the rest of the turn, which answers after them); an assistant turn's
    `tool_use` blocks become `tool_calls`. `max_tokens` is required, as Anthropic requires it.
    Raises InvalidRequest, naming the field, for what is missing or cannot be translated.
    """
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest("max_tokens: must be a positive integer", param="max_tokens")
    messages: list[dict[str, Any]] = []
    system = _system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequest("stream: must be a boolean", param="stream")
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    for index, turn in enumerate(turns):
        messages.extend(_turn(turn, where=f"messages.{index}"))
    request: dict[str, Any] = {
        "model": body.get("model"),
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": stream is True,
    }
    for name, openai_name in _PASSED.items():
        if body.get(name) is not None:
            request[openai_name] = body[name]
    tools = _tools(body.get("tools"))
    if tools:
        request["tools"] = tools
    choice = body.get("tool_choice")
    if choice is not None:
        request.update(_tool_choice(choice))
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        request["user"] = metadata["user_id"]
    return request


def _system_text(system: Any) -> str:
    if system is None or isinstance(system, str):
        return system or ""
    if isinstance(system, list) and all(
        isinstance(block, dict) and block.get("type") == "text" for block in system
    ):
        return "\n\n".join(str(block.get("text", "")) for block in system)
    raise InvalidRequest("system: must be a string or a list of text blocks", param="system")


def _blocks(content: Any, *, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(block, dict) for block in content):
        raise InvalidRequest(f"{where}.content: must be a string or a list of blocks", param=where)
    return content


def _turn(turn: Any, *, where: str) -> list[dict[str, Any]]:
    role = turn.get("role") if isinstance(turn, dict) else None
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role: must be 'user' or 'assistant'", param=where)
    blocks = _blocks(turn.get("content"), where=where)
    if role == "assistant":
        return [_assistant_message(blocks, where=where)]
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for number, block in enumerate(blocks):
        block_where = f"{where}.content.{number}"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append(
                {"type": "image_url", "image_url": {"url": _image_url(block, block_where)}}
            )
        elif kind == "tool_result":
            tool_messages.append(_tool_message(block, where=block_where))
        else:
            raise _unsupported(kind, block_where)
    if parts:
        tool_messages.append({"role": "user", "content": parts})
    return tool_messages


def _assistant_message(blocks: list[dict[str, Any]], *, where: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for number, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            if not block.get("id") or not block.get("name"):
                raise InvalidRequest(
                    f"{where}.content.{number}: a tool_use block needs an 'id' and a 'name'",
                    param=where,
                )
            arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
            calls.append(
                {
                    "id": str(block["id"]),
                    "type": "function",
                    "function": {"name": str(block["name"]), "arguments": arguments},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # the model's own earlier reasoning: not sent on to other providers
        else:
            raise _unsupported(kind, f"{where}.content.{number}")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _image_url(block: dict[str, Any], where: str) -> str:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64" and source.get("data"):
        return f"data:{source.get('media_type')};base64,{source['data']}"
    if isinstance(source, dict) and source.get("type") == "url" and source.get("url"):
        return str(source["url"])
    raise InvalidRequest(f"{where}.source: must be a base64 or url image source", param=where)


def _tool_message(block: dict[str, Any], *, where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise InvalidRequest(f"{where}.tool_use_id: Field required", param=where)
    content = block.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    else:
        inner = _blocks(content, where=where)
        if any(part.get("type") != "text" for part in inner):
            raise InvalidRequest(
                f"{where}.content: only text is supported in a tool_result for this model",
                param=where,
            )
        text = "".join(str(part.get("text", "")) for part in inner)
    if block.get("is_error") is True:
        text = f"Error: {text}"  # OpenAI has no error flag on a tool result; the model reads it
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _unsupported(kind: Any, where: str) -> InvalidRequest:
    return InvalidRequest(
        f"{where}: content blocks of type '{kind}' are not supported", param=where
    )


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidRequest("tools: must be a list", param="tools")
    result = []
    for number, tool in enumerate(tools):
        if (
            not isinstance(tool, dict)
            or tool.get("type") not in (None, "custom")
            or not isinstance(tool.get("input_schema"), dict)
        ):
            raise InvalidRequest(
                f"tools.{number}: only custom tools (name, input_schema) are supported",
                param="tools",
            )
        function: dict[str, Any] = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description"):
            function["description"] = tool["description"]
        result.append({"type": "function", "function": function})
    return result


def _tool_choice(choice: Any) -> dict[str, Any]:
    kind = choice.get("type") if isinstance(choice, dict) else None
    translated: dict[str, Any]
    if kind == "auto":
        translated = {"tool_choice": "auto"}
    elif kind == "any":
        translated = {"tool_choice": "required"}
    elif kind == "none":
        return {"tool_choice": "none"}
    elif kind == "tool" and isinstance(choice, dict) and choice.get("name"):
        translated = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    else:
        raise InvalidRequest(
            "tool_choice: must be of type 'auto', 'any', 'tool' or 'none'", param="tool_choice"
        )
    if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True:
        translated["parallel_tool_calls"] = False
    return translated


# --- response: OpenAI chat.completion → Anthropic Message ----------------------------------


def _message_id(openai_id: Any) -> str:
    own = str(openai_id or "").removeprefix("chatcmpl-")
    return own if own.startswith("msg_") else f"msg_{own or uuid.uuid4().hex}"


def _anthropic_usage(usage: TokenUsage) -> dict[str, int]:
    # Anthropic's `input_tokens` are the prompt tokens neither read from nor written to the
    # cache: the three together are the prompt.
    uncached = usage.input_tokens - usage.cached_input_tokens - usage.cache_write_input_tokens
    return {
        "input_tokens": max(uncached, 0),
        "output_tokens": usage.output_tokens,
        "cache_creation_input_tokens": usage.cache_write_input_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
    }


def _stop(choice: dict[str, Any]) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence) of an OpenAI choice. A matched stop string is in the
    choice's `stop_reason`, where vLLM and the Anthropic adapter report it."""
    finish = choice.get("finish_reason")
    matched = choice.get("stop_reason")
    if finish == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    return (_STOP_REASONS.get(str(finish), "end_turn") if finish else None), None


def _tool_input(arguments: Any) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if isinstance(arguments, str) and arguments else {}
    except ValueError:
        value = None
    # A model that wrote arguments which are not an object: passed on rather than lost.
    return value if isinstance(value, dict) else {"arguments": arguments}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def message_from_openai(completion: dict[str, Any], usage: TokenUsage) -> dict[str, Any]:
    """The Messages API `message` for a chat.completion and the usage it was billed for."""
    choices = completion.get("choices") or [{}]
    choice = _object(choices[0])
    # It runs after the request is settled. The adapters have checked what is read here (an
    # OpenAI-style answer's in gateway/providers/openai.py `_readable_chat_choice`), so that
    # an answer whose tool call would be lost fails over uncharged; what else is malformed
    # keeps what can be read of it rather than failing a request that was charged.
    reply = _object(choice.get("message"))
    content: list[dict[str, Any]] = []
    text = content_text(reply.get("content")) or reply.get("refusal")
    if text:
        content.append({"type": "text", "text": str(text)})
    calls = reply.get("tool_calls")
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            continue
        function = _object(call.get("function"))
        content.append(
            {
                "type": "tool_use",
                "id": str(call.get("id")),
                "name": str(function.get("name")),
                "input": _tool_input(function.get("arguments")),
            }
        )
    stop_reason, stop_sequence = _stop(choice)
    return {
        "id": _message_id(completion.get("id")),
        "type": "message",
        "role": "assistant",
        "model": completion.get("model"),
        "content": content,
        "stop_reason": stop_reason or "end_turn",
        "stop_sequence": stop_sequence,
        "usage": _anthropic_usage(usage),
    }


# --- stream: OpenAI chunks → Anthropic streaming events ------------------------------------


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


@dataclass(slots=True)
class MessageEvents:
    """Turns the pipeline's stream events, one at a time, into Messages events.

    Content blocks open as the OpenAI deltas need them (text, then one `tool_use` block per
    tool call) and each closes when the next opens or the message ends. The `message_delta`
    waits for the end, since the usage chunk follows the finish reason.
    """

    # The prompt's tokens as estimated for the charge when the provider reports none: what
    # message_start announces, and message_delta repeats when no usage came.
    prompt_tokens: int = 0
    started: bool = False
    open_block: int | None = None
    blocks: int = 0
    tool_blocks: dict[int, int] = field(default_factory=dict)  # OpenAI tool index → block
    stop: tuple[str | None, str | None] = (None, None)
    usage: TokenUsage | None = None
    relayed: list[str] = field(default_factory=list)
    comments: list[bytes] = field(default_factory=list)  # SSE comments held for the end

    def translate(self, event: StreamEvent) -> list[bytes]:
        """The Messages events for one of the pipeline's events; the charge is held and passed
        on (as an SSE comment) just before the end."""
        if isinstance(event, Charge):
            self.comments.append(cost_comment(event.cost_usd))
            return []
        if isinstance(event, StreamEnd):
            if event.error is None:
                return [*self._start({}), *self._end()]
            message = event.error.message or "The stream failed."
            return [*self._held_comments(), anthropic_stream_error_event(GatewayError(message))]
        chunk = event
        events = self._start(chunk)
        if chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict):
            self.usage = reported_usage(chunk["usage"])
            return events
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if text := content_text(delta.get("content")):
                events += self._text(text)
            for call in delta.get("tool_calls") or []:
                events += self._tool_call(call)
            if choice.get("finish_reason"):
                self.stop = _stop(choice)
        return events

    def _start(self, chunk: dict[str, Any]) -> list[bytes]:
        if self.started:
            return []
        self.started = True
        message: dict[str, Any] = {
            "id": _message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model"),
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # The provider's figures are known only at the end: message_delta carries them
            # (cumulative figures there replace these in the SDKs' final message).
            "usage": {
                "input_tokens": self.prompt_tokens,
                "output_tokens": 0,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        return [_event("message_start", {"message": message}), _event("ping", {})]

    def _open(self, block: dict[str, Any]) -> list[bytes]:
        events = self._close()
        self.open_block, self.blocks = self.blocks, self.blocks + 1
        events.append(
            _event("content_block_start", {"index": self.open_block, "content_block": block})
        )
        return events

    def _close(self) -> list[bytes]:
        if self.open_block is None:
            return []
        index, self.open_block = self.open_block, None
        return [_event("content_block_stop", {"index": index})]

    def _text(self, text: str) -> list[bytes]:
        events = []
        if self.open_block is None or self.open_block in self.tool_blocks.values():
            events = self._open({"type": "text", "text": ""})
        self.relayed.append(text)
        delta = {"type": "text_delta", "text": text}
        return [*events, _event("content_block_delta", {"index": self.open_block, "delta": delta})]

    def _tool_call(self, call: dict[str, Any]) -> list[bytes]:
        function = call.get("function") or {}
        number = int(call.get("index") or 0)
        events = []
        if number not in self.tool_blocks:
            block = {
                "type": "tool_use",
                "id": str(call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}"),
                "name": str(function.get("name")),
                "input": {},
            }
            events = self._open(block)
            self.tool_blocks[number] = self.blocks - 1
            self.relayed.append(str(function.get("name")))
        arguments = function.get("arguments")
        if arguments:
            self.relayed.append(str(arguments))
            delta = {"type": "input_json_delta", "partial_json": str(arguments)}
            index = self.tool_blocks[number]
            events.append(_event("content_block_delta", {"index": index, "delta": delta}))
        return events

    def _end(self) -> list[bytes]:
        stop_reason, stop_sequence = self.stop
        if self.usage is not None:
            usage: dict[str, int] = _anthropic_usage(self.usage)
        else:
            # No usage from the provider: the client sees an estimate, as the wallet does.
            usage = {
                "input_tokens": self.prompt_tokens,
                "output_tokens": max(estimate_tokens("".join(self.relayed)), len(self.relayed)),
            }
        delta = {"stop_reason": stop_reason or "end_turn", "stop_sequence": stop_sequence}
        return [
            *self._close(),
            _event("message_delta", {"delta": delta, "usage": usage}),
            *self._held_comments(),
            _event("message_stop", {}),
        ]

    def _held_comments(self) -> list[bytes]:
        comments, self.comments = self.comments, []
        return comments


async def message_events(
    events: AsyncIterator[StreamEvent], *, prompt_tokens: int
) -> AsyncIterator[bytes]:
    """The Messages streaming events for the pipeline's events, as they arrive;
    `prompt_tokens` is the prompt's estimate, announced until the provider's figures come.

    Closing this iterator (the client went away) closes the pipeline's, whose settlement then
    runs as for any stream.
    """
    translation = MessageEvents(prompt_tokens=prompt_tokens)
    try:
        async for event in events:
            translated = translation.translate(event)
            if translated:
                # One write for all the events one chunk became (message_start, ping and the
                # first block's start and delta come together): each write to the client is
                # a system call, as costly as the rest of a frame's work (issue 7).
                yield b"".join(translated)
    finally:
        await close_events(events)
