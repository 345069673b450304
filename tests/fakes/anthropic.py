"""A fake Anthropic upstream that speaks the Messages API (`POST /v1/messages`) over real HTTP.

The gateway talks to it exactly as it would talk to api.anthropic.com: through a socket, with
the `x-api-key` and `anthropic-version` headers and Anthropic's JSON shapes, errors included.
It checks requests the way the real API does where a translation could go wrong (unknown
fields, missing `max_tokens`, empty text blocks, a `tool_use` without its `tool_result` right
after, a `tool_result` answering no call), so a test that passes against it sends requests
Anthropic would accept.

Answers are deterministic. A request that offers tools and whose last user message mentions
"weather" gets a `tool_use` of `get_weather` with `{"city": "Paris"}`; a request that ends with
tool results gets "The tool answered: …"; anything else gets a fixed sentence echoing the last
user message, cut to `max_tokens` words or at a stop sequence. One word is one token. Every
request is recorded in `calls` and every answer in `replies`, so a test can compare what the
gateway billed with what the upstream reported.

Like tests/fakes/provider.py it is a raw ASGI application served by uvicorn in a thread.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from tests.fakes.base import Scope, Send, send_json
from tests.fakes.provider import RecordedCall, cut_connection
from tests.fakes.recording import RecordingFake

__all__ = ["REPLY_PREFIX", "TOOL_REPLY_PREFIX", "FakeAnthropic", "count_input_tokens", "error_body"]


REPLY_PREFIX: Final = "Hello from the fake Anthropic provider. You said:"
TOOL_REPLY_PREFIX: Final = "The tool answered:"
#: Tokens the fake charges per message on top of its words.
TOKENS_PER_MESSAGE: Final = 3
_ECHOED_WORDS: Final = 5

# The top-level fields of MessageCreateParams that the fake knows; the real API refuses others.
_REQUEST_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "tools",
        "tool_choice",
        "metadata",
        "output_config",
        "thinking",
        "service_tier",
    }
)
_BLOCK_TYPES: Final = frozenset({"text", "image", "tool_use", "tool_result"})
_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


# --- deterministic "model" ------------------------------------------------------------------


def _words_of(content: Any) -> list[str]:
    """The words of a message's content, as the fake counts them."""
    if isinstance(content, str):
        return content.split()
    words: list[str] = []
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, Mapping):
            continue
        if block.get("type") == "text":
            words += str(block.get("text", "")).split()
        elif block.get("type") == "tool_use":
            words += [str(block.get("name")), *json.dumps(block.get("input")).split()]
        elif block.get("type") == "tool_result":
            words += _words_of(block.get("content"))
    return words


def count_input_tokens(request: Mapping[str, Any]) -> int:
    """The fake's prompt tokens for a Messages request: the words of the system prompt and of
    every message (tool calls and results included), plus 3 per message."""
    messages = request.get("messages") or []
    return len(_words_of(request.get("system"))) + sum(
        len(_words_of(m.get("content"))) + TOKENS_PER_MESSAGE for m in messages
    )


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content or [] if b.get("type") == "text"]
        if texts:
            return " ".join(texts)
    return ""


def _tool_results(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if message.get("role") != "user" or not isinstance(content, list):
        return []
    return [block for block in content if block.get("type") == "tool_result"]


def _wanted_tool(request: dict[str, Any]) -> str | None:
    """The tool the fake calls for this request, if any."""
    tools = request.get("tools") or []
    choice = request.get("tool_choice") or {"type": "auto"}
    if not tools or choice.get("type") == "none" or _tool_results(request["messages"][-1]):
        return None
    if choice.get("type") == "tool":
        return str(choice["name"])
    names = [tool["name"] for tool in tools]
    wants = choice.get("type") == "any" or "weather" in _last_user_text(request["messages"]).lower()
    if not wants:
        return None
    return "get_weather" if "get_weather" in names else names[0]


def _text_reply(request: dict[str, Any]) -> tuple[str, str, str | None]:
    """(text, stop_reason, stop_sequence) for a request the fake answers with text."""
    results = _tool_results(request["messages"][-1])
    if results:
        words = [*TOOL_REPLY_PREFIX.split(), *_words_of(results[0].get("content"))[:_ECHOED_WORDS]]
    else:
        echoed = _last_user_text(request["messages"]).split()[:_ECHOED_WORDS]
        words = [*REPLY_PREFIX.split(), *echoed]
    text = " ".join(words)
    for sequence in request.get("stop_sequences") or []:
        if sequence in text:
            return text[: text.index(sequence)], "stop_sequence", sequence
    if len(words) > request["max_tokens"]:
        return " ".join(words[: request["max_tokens"]]), "max_tokens", None
    return text, "end_turn", None


# --- request checks, as the real API makes them ---------------------------------------------


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _check_request(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Invalid("The request body must be a JSON object.")
    for name in body:
        if name not in _REQUEST_FIELDS:
            raise _Invalid(f"{name}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str):
        raise _Invalid("model: Field required")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _Invalid("max_tokens: Field required (a positive integer)")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise _Invalid("system: Input should be a valid string or a list of text blocks")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("messages: at least one message is required")
    for index, message in enumerate(messages):
        _check_message(message, index, messages)
    for index, tool in enumerate(body.get("tools") or []):
        if not isinstance(tool, dict) or not tool.get("name"):
            raise _Invalid(f"tools.{index}.name: Field required")
        if not isinstance(tool.get("input_schema"), dict):
            raise _Invalid(f"tools.{index}.input_schema: Field required")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in {
            "auto",
            "any",
            "tool",
            "none",
        }:
            raise _Invalid("tool_choice: Input tag does not match any of the expected tags")
        if choice["type"] == "tool" and not choice.get("name"):
            raise _Invalid("tool_choice.tool.name: Field required")
    return body


def _check_message(message: Any, index: int, messages: list[Any]) -> None:
    where = f"messages.{index}"
    if not isinstance(message, dict) or message.get("role") not in {"user", "assistant"}:
        raise _Invalid(f"{where}.role: Input should be 'user' or 'assistant'")
    content = message.get("content")
    if isinstance(content, str):
        if not content:
            raise _Invalid(f"{where}: user messages must have non-empty content")
        return
    if not isinstance(content, list) or not content:
        raise _Invalid(f"{where}: all messages must have non-empty content")
    for number, block in enumerate(content):
        block_where = f"{where}.content.{number}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind not in _BLOCK_TYPES:
            raise _Invalid(f"{block_where}: Input tag '{kind}' does not match the expected tags")
        if kind == "text" and not block.get("text"):
            raise _Invalid(f"{block_where}: text content blocks must be non-empty")
        if kind == "image":
            source = block.get("source") or {}
            if source.get("type") == "base64":
                if source.get("media_type") not in {
                    "image/jpeg",
                    "image/png",
                    "image/gif",
                    "image/webp",
                } or not source.get("data"):
                    raise _Invalid(f"{block_where}.source: invalid base64 image source")
            elif source.get("type") != "url" or not source.get("url"):
                raise _Invalid(f"{block_where}.source: Input tag does not match the expected tags")
        if kind == "tool_use" and (
            message["role"] != "assistant"
            or not block.get("id")
            or not block.get("name")
            or not isinstance(block.get("input"), dict)
        ):
            raise _Invalid(f"{block_where}: invalid tool_use block")
        if kind == "tool_result":
            previous = messages[index - 1] if index else {}
            asked = {
                b.get("id")
                for b in previous.get("content") or []
                if isinstance(b, dict) and b.get("type") == "tool_use"
            }
            if message["role"] != "user" or block.get("tool_use_id") not in asked:
                raise _Invalid(
                    f"{block_where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in the previous message."
                )
    if message["role"] == "assistant":
        called = [b["id"] for b in content if b.get("type") == "tool_use"]
        following = messages[index + 1] if index + 1 < len(messages) else None
        answered = {b.get("tool_use_id") for b in (_tool_results(following) if following else [])}
        missing = [call for call in called if call not in answered]
        if missing and following is not None:
            raise _Invalid(
                f"messages.{index + 1}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(missing)}. Each `tool_use` block must have a "
                "corresponding `tool_result` block in the next message."
            )


# --- the server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamFault:
    cut_after_deltas: int | None = None  # connection dropped after this many content deltas
    omit_usage: bool = False  # no `usage` in message_start nor message_delta
    error_after_deltas: int | None = None  # an `error` event (overloaded) after this many
    extra_event: Any = None  # sent as is right after the first content block delta


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope."""
    return {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
        "request_id": f"req_{uuid.uuid4().hex}",
    }


class FakeAnthropic(RecordingFake[_StreamFault]):
    """An Anthropic-compatible upstream on 127.0.0.1 at a free port, served in a thread.

    Point clients at `base_url` (`http://127.0.0.1:<port>/v1`). With `api_key` set, only that
    key is accepted (in `x-api-key`, or as a bearer token); otherwise any non-empty key is.
    `fail_next` and `delay_next` queue faults, one per request. Until `reset()`,
    `cache_read_input_tokens` and `cache_creation_input_tokens` say how many of each request's
    prompt tokens the fake reports as read from or written to the prompt cache (the rest are
    reported as `input_tokens`, as Anthropic does).
    """

    _no_stream_fault = _StreamFault()

    def _reset_settings(self) -> None:
        self.cache_read_input_tokens = 0
        self.cache_creation_input_tokens = 0

    def cut_stream_after(self, deltas: int) -> None:
        """The next streamed answer loses its connection right after `deltas` content block
        deltas: no content_block_stop, message_delta nor message_stop."""
        self._queue_stream_fault(_StreamFault(cut_after_deltas=deltas))

    def omit_usage_next(self) -> None:
        """The next streamed answer is complete but reports no `usage` at all."""
        self._queue_stream_fault(_StreamFault(omit_usage=True))

    def error_stream_after(self, deltas: int) -> None:
        """The next streamed answer sends an `error` event (overloaded_error) after `deltas`
        content block deltas, as Anthropic does when it fails mid-stream, and ends."""
        self._queue_stream_fault(_StreamFault(error_after_deltas=deltas))

    def send_event_next(self, event: Any) -> None:
        """The next streamed answer gets `event` (any JSON value: an event of a shape Anthropic
        does not send, say) as its data right after its first content block delta."""
        self._queue_stream_fault(_StreamFault(extra_event=event))

    def _error_body_for(self, status: int) -> dict[str, Any]:
        return _scripted_error(status)

    async def _send_json(
        self, send: Send, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        await _send_json(send, status, payload, headers)

    async def _answer(self, scope: Scope, call: RecordedCall, send: Send) -> None:
        # The real API's order: authentication, then routing, then the body.
        # `x-api-key` is the documented header; newer SDKs send the key as a bearer token.
        headers = call.headers
        scheme, _, token = headers.get("authorization", "").partition(" ")
        key = headers.get("x-api-key") or (token.strip() if scheme.lower() == "bearer" else "")
        if not key or (self.api_key is not None and key != self.api_key):
            await _send_json(send, 401, error_body(401, "invalid x-api-key"))
            return
        if (call.method, call.path) != ("POST", "/v1/messages"):
            await _send_json(send, 404, error_body(404, "Not found"))
            return
        if not headers.get("anthropic-version"):
            await _send_json(send, 400, error_body(400, "anthropic-version: header is required"))
            return
        try:
            request = _check_request(call.json)
        except _Invalid as invalid:
            await _send_json(send, 400, error_body(400, invalid.message))
            return
        reply = self._message(request)
        fault = self._record_reply(reply, streamed=bool(request.get("stream")))
        if request.get("stream"):
            await _send_stream(send, reply, fault)
        else:
            await _send_json(send, 200, reply)

    def _message(self, request: dict[str, Any]) -> dict[str, Any]:
        tool = _wanted_tool(request)
        content: list[dict[str, Any]]
        stop_sequence: str | None = None
        if tool is not None:
            tool_input = {"city": "Paris"}
            content = [
                {
                    "type": "tool_use",
                    "id": f"toolu_{uuid.uuid4().hex[:24]}",
                    "name": tool,
                    "input": tool_input,
                }
            ]
            stop_reason = "tool_use"
        else:
            text, stop_reason, stop_sequence = _text_reply(request)
            content = [{"type": "text", "text": text}]
        prompt = count_input_tokens(request)
        read = min(self.cache_read_input_tokens, prompt)
        written = min(self.cache_creation_input_tokens, prompt - read)
        return {
            "id": f"msg_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": request["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": {
                "input_tokens": prompt - read - written,
                "cache_creation_input_tokens": written,
                "cache_read_input_tokens": read,
                "output_tokens": len(_words_of(content)),
            },
        }


def _scripted_error(status: int) -> dict[str, Any]:
    """Anthropic's error body for a scripted failure."""
    if status == 401:
        return error_body(status, "invalid x-api-key")
    if status == 529:
        return error_body(status, "Overloaded")
    if status >= 500:
        return error_body(status, f"Internal server error (scripted {status}).")
    return error_body(status, f"Scripted failure {status}.")


async def _send_json(
    send: Send, status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> None:
    await send_json(
        send, status, payload, headers, default_headers={"request-id": f"req_{uuid.uuid4().hex}"}
    )


def _stream_events(reply: dict[str, Any], fault: _StreamFault) -> list[Any]:
    """The Messages API streaming events for `reply`, in the documented order: message_start
    (usage with the prompt tokens and 1 output token), ping, per content block its
    content_block_start, deltas (one word of text, or a piece of the tool input's JSON, each)
    and content_block_stop, then message_delta (stop reason, cumulative usage) and
    message_stop. Faults truncate or replace the tail."""
    usage = reply["usage"]
    start_usage = {**usage, "output_tokens": 1}
    message = {**reply, "content": [], "stop_reason": None, "stop_sequence": None}
    message["usage"] = start_usage
    if fault.omit_usage:
        del message["usage"]
    events: list[Any] = [{"type": "message_start", "message": message}]
    events.append({"type": "ping"})
    deltas = 0
    for index, block in enumerate(reply["content"]):
        start: dict[str, Any]
        if block["type"] == "text":
            start = {"type": "text", "text": ""}
            words = block["text"].split(" ")
            pieces = [
                {"type": "text_delta", "text": w if not i else f" {w}"} for i, w in enumerate(words)
            ]
        else:
            start = {**block, "input": {}}
            raw = json.dumps(block["input"])
            cut = len(raw) // 2
            pieces = [
                {"type": "input_json_delta", "partial_json": part}
                for part in (raw[:cut], raw[cut:])
            ]
        events.append({"type": "content_block_start", "index": index, "content_block": start})
        for piece in pieces:
            if fault.cut_after_deltas is not None and deltas >= fault.cut_after_deltas:
                return events  # and the connection drops
            if fault.error_after_deltas is not None and deltas >= fault.error_after_deltas:
                error = {"type": "overloaded_error", "message": "Overloaded"}
                return [*events, {"type": "error", "error": error}]
            events.append({"type": "content_block_delta", "index": index, "delta": piece})
            if deltas == 0 and fault.extra_event is not None:
                events.append(fault.extra_event)
            deltas += 1
        events.append({"type": "content_block_stop", "index": index})
    message_delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": reply["stop_reason"], "stop_sequence": reply["stop_sequence"]},
        "usage": {"output_tokens": usage["output_tokens"]},
    }
    if fault.omit_usage:
        del message_delta["usage"]
    events += [message_delta, {"type": "message_stop"}]
    return events


async def _send_stream(send: Send, reply: dict[str, Any], fault: _StreamFault) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"request-id", f"req_{uuid.uuid4().hex}".encode()),
            ],
        }
    )
    for event in _stream_events(reply, fault):
        kind = event.get("type") if isinstance(event, dict) else None
        data = f"event: {kind}\ndata: {json.dumps(event)}\n\n"
        await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
    if fault.cut_after_deltas is not None:
        # A broken connection: the response ends without its terminating chunk.
        await cut_connection()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
