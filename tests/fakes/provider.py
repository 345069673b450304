"""A fake upstream LLM provider that speaks OpenAI's wire format over real HTTP, for tests.

The gateway under test talks to it exactly as it talks to a real provider: through a socket, with
real HTTP/1.1, JSON bodies and server-sent events. Answers are deterministic so a test can compute
the exact usage (and so the exact charge) with `count_prompt_tokens` and `reply_for`. Every
request is recorded, and a test can script what the next requests get: an error status (with
headers such as Retry-After), latency before the first byte, a stream cut midway, or a stream
without its usage chunk.

It is a raw ASGI application served by uvicorn in a daemon thread (tests/servers.py), on
purpose: no web framework sits between the test and the bytes on the wire.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

from tests.fakes.base import (
    FakeUpstream,
    Receive,
    Scope,
    ScriptedAnswer,
    ScriptedFaults,
    Send,
    read_body,
    send_json,
)

__all__ = [
    "EMBEDDING_DIMENSIONS",
    "MODELS",
    "FakeProvider",
    "RecordedCall",
    "count_prompt_tokens",
    "count_text_tokens",
    "embedding_for",
    "finish_reason_for",
    "reply_for",
    "text_reply_for",
]


#: Length of every vector `/v1/embeddings` returns.
EMBEDDING_DIMENSIONS: Final = 8
#: The model ids `GET /v1/models` lists (any model name is accepted by the other endpoints).
MODELS: Final = ("fake-small", "fake-large", "fake-embedding")
#: Tokens the fake charges per message on top of its words, like OpenAI's per-message overhead.
TOKENS_PER_MESSAGE: Final = 3
#: OpenAI's default `max_tokens` for the legacy completions endpoint.
LEGACY_DEFAULT_MAX_TOKENS: Final = 16

_REPLY_PREFIX: Final = "Hello from the fake provider. You said:"
_ECHOED_WORDS: Final = 5


# --- deterministic "model" ------------------------------------------------------------------


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts of which only text counts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The fake's prompt tokens: whitespace-separated words of every message's text, plus 3 per
    message."""
    return sum(len(_text_of(m.get("content")).split()) + TOKENS_PER_MESSAGE for m in messages)


def _full_reply_words(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    last_user = next(
        (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    return [*_REPLY_PREFIX.split(), *last_user.split()[:_ECHOED_WORDS]]


def reply_for(messages: Sequence[Mapping[str, Any]], max_tokens: int | None = None) -> str:
    """The fake's reply: a fixed sentence echoing the first 5 words of the last user message, cut
    to `max_tokens` words when given. One word is one completion token."""
    words = _full_reply_words(messages)
    return " ".join(words if max_tokens is None else words[:max_tokens])


def finish_reason_for(messages: Sequence[Mapping[str, Any]], max_tokens: int | None = None) -> str:
    """`"length"` when `max_tokens` cut the reply short, else `"stop"`."""
    cut = max_tokens is not None and len(_full_reply_words(messages)) > max_tokens
    return "length" if cut else "stop"


def _prompt_texts(prompt: Any) -> list[str]:
    """A `prompt`/`input` as texts: a string, a token array (its ids, as words), or a list of
    either."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [" ".join(str(token) for token in prompt)]
    if isinstance(prompt, list):
        return [text for item in prompt for text in _prompt_texts(item)]
    return []


def count_text_tokens(prompt: Any) -> int:
    """The fake's tokens for a legacy `prompt` or an embeddings `input`: its words (a token
    array: its length), summed over a list."""
    return sum(len(text.split()) for text in _prompt_texts(prompt))


def text_reply_for(prompt: str, max_tokens: int | None = LEGACY_DEFAULT_MAX_TOKENS) -> str:
    """The fake's legacy completion of one prompt: the chat reply to it as a user message."""
    return reply_for([{"role": "user", "content": prompt}], max_tokens)


def embedding_for(text: str) -> list[float]:
    """The fake's embedding of `text`: 8 floats in [-1, 1], derived from its SHA-256."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 127.5 - 1.0, 6) for byte in digest[:EMBEDDING_DIMENSIONS]]


# --- what tests see and script --------------------------------------------------------------


@dataclass(frozen=True)
class RecordedCall:
    """One request the fake received: header names are lower-case; `json` is the parsed body,
    or None when there was no body or it was not valid JSON."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any


@dataclass(frozen=True)
class _Behaviour(ScriptedAnswer):
    """What one request gets; the default is a normal answer. Besides the faults before the
    first byte, a stream may be cut, stalled or lose its usage chunk."""

    cut_after_chunks: int | None = None
    omit_usage: bool = False
    stall_after_chunks: int | None = None  # pause this stream after this many content chunks
    stall_seconds: float = 0.0
    # Sent after the first content chunk: a JSON value, or bytes as they are.
    extra_chunk: Any = None


_NORMAL: Final = _Behaviour()


class _StreamCut(Exception):
    """Raised inside the app to make uvicorn drop the connection mid-response.

    ASGI has no "abort" message; an exception after the response started is the one way to get
    uvicorn to close the transport without the terminating chunk, which is what a crashed
    upstream looks like to a client.
    """


async def cut_connection() -> NoReturn:
    """Drop the connection mid-response, right after the last event sent: the gateway must
    still relay every event received before the drop (gateway/outbound.py `body_chunks`),
    however late it reads them."""
    raise _StreamCut


class _HideStreamCuts(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" record for scripted cuts only, so a
    scripted fault does not look like a crash in the test output."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, _StreamCut)


_uvicorn_error_logger = logging.getLogger("uvicorn.error")
if not any(isinstance(f, _HideStreamCuts) for f in _uvicorn_error_logger.filters):
    _uvicorn_error_logger.addFilter(_HideStreamCuts())


class _RequestError(Exception):
    """A request the fake rejects the way OpenAI would (400 invalid_request_error)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _error_body(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error envelope."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _scripted_error_body(status: int) -> dict[str, Any]:
    # Types and codes as OpenAI uses them, so client code that branches on them is exercised.
    if status == 429:
        return _error_body(
            "Rate limit reached (scripted by the fake provider).",
            "requests",
            code="rate_limit_exceeded",
        )
    if status == 401:
        return _error_body(
            "Incorrect API key provided.", "invalid_request_error", code="invalid_api_key"
        )
    if status >= 500:
        return _error_body(
            f"The server had an error while processing your request (scripted {status}).",
            "server_error",
        )
    return _error_body(f"Scripted failure {status}.", "invalid_request_error")


class FakeProvider(ScriptedFaults[_Behaviour], FakeUpstream):
    """An OpenAI-compatible upstream on 127.0.0.1 at a free port, served by uvicorn in a thread.

    Use `start()`/`stop()` or a `with` block; point clients at `base_url`. Every request is
    appended to `calls`. Scripted behaviours (`fail_next`, `answer_next`, `delay_next`,
    `cut_stream_after`, `omit_usage_next`, `send_chunk_next`) queue up and are consumed one per
    request, in order, whatever the request is; requests that find the queue empty get a
    normal answer.

    Two settings apply to every request until `reset()`: `latency` (seconds before the first
    byte, added to any scripted delay) and `reported_usage` (a (prompt, completion) pair to report
    instead of the computed usage, for tests that need specific token counts).
    `chunk_interval` is the pause between stream chunks.
    """

    def __init__(self, *, chunk_interval: float = 0.0) -> None:
        """Create a stopped provider; `chunk_interval` seconds separate streamed chunks."""
        super().__init__()
        self.chunk_interval = chunk_interval
        self.latency = 0.0
        self.reported_usage: tuple[int, int] | None = None
        self.calls: list[RecordedCall] = []

    # --- life cycle ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded calls and pending scripted behaviours; restore latency and usage."""
        with self._lock:
            self.calls.clear()
            self._script.clear()
            self.latency = 0.0
            self.reported_usage = None

    # --- scripting ------------------------------------------------------------------------

    def cut_stream_after(self, chunks: int) -> None:
        """The next request, if it streams, loses its connection right after `chunks` content
        chunks: no finish chunk, no usage chunk, no `[DONE]`."""
        with self._lock:
            self._script.append(_Behaviour(cut_after_chunks=chunks))

    def stall_stream_after(self, chunks: int, *, seconds: float) -> None:
        """The next request, if it streams, goes silent for `seconds` right after `chunks`
        content chunks, then carries on (an upstream stalled mid-stream)."""
        with self._lock:
            self._script.append(_Behaviour(stall_after_chunks=chunks, stall_seconds=seconds))

    def omit_usage_next(self) -> None:
        """The next request, if it streams, ends without the usage chunk even when
        `stream_options.include_usage` asked for it (the stream is otherwise complete)."""
        with self._lock:
            self._script.append(_Behaviour(omit_usage=True))

    def send_chunk_next(self, chunk: Any) -> None:
        """The next request, if it streams (a chat or a legacy completion), gets `chunk` as it
        is right after its first content chunk (a chunk of a shape a provider should not send,
        say): a JSON value, or bytes sent as the event's data as they are (what json.dumps
        cannot write)."""
        with self._lock:
            self._script.append(_Behaviour(extra_chunk=chunk))

    _answer_type = _Behaviour

    def _error_body_for(self, status: int) -> dict[str, Any]:
        return _scripted_error_body(status)

    async def _send_json(
        self, send: Send, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        await _send_json(send, status, payload, headers)

    # --- the ASGI application -------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        if raw is None:
            return
        method: str = scope["method"]
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        invalid_json = False
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                invalid_json = True
        with self._lock:
            self.calls.append(RecordedCall(method, path, headers, body))
        behaviour = self._next_scripted() or _NORMAL
        if await self._answered_as_scripted(send, behaviour, extra_delay=self.latency):
            return
        # The same order as OpenAI: authentication, then routing, then the body.
        if not _has_bearer_token(headers.get("authorization", "")):
            await _send_json(
                send,
                401,
                _error_body(
                    "You didn't provide an API key. Provide it in the Authorization header "
                    "(Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                ),
            )
            return
        route = (method, path)
        if route not in _ROUTES:
            await _send_json(
                send, 404, _error_body(f"Invalid URL ({method} {path})", "invalid_request_error")
            )
            return
        if invalid_json:
            await _send_json(
                send,
                400,
                _error_body(
                    "We could not parse the JSON body of your request.", "invalid_request_error"
                ),
            )
            return
        try:
            if route == ("GET", "/v1/models"):
                await _send_json(send, 200, _models())
            elif route == ("POST", "/v1/embeddings"):
                await _send_json(send, 200, _embeddings(_json_object(body)))
            elif route == ("POST", "/v1/completions"):
                text_request = _completion_request(_json_object(body))
                if text_request.stream:
                    await self._stream_completion(send, text_request, behaviour)
                else:
                    await _send_json(send, 200, _text_completion(text_request, self.reported_usage))
            else:
                request = _chat_request(_json_object(body))
                if request.stream:
                    await self._stream_chat(send, request, behaviour)
                else:
                    await _send_json(send, 200, _chat_completion(request, self.reported_usage))
        except _RequestError as error:
            await _send_json(
                send,
                400,
                _error_body(error.message, "invalid_request_error", param=error.param),
            )

    async def _stream_completion(
        self, send: Send, request: _CompletionRequest, behaviour: _Behaviour
    ) -> None:
        """A legacy completion streamed as `text_completion` chunks, the first prompt's only."""
        words = text_reply_for(request.prompts[0], request.max_tokens).split()
        base: dict[str, Any] = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": request.model,
        }
        if request.include_usage:
            base["usage"] = None

        def chunk(text: str, finish_reason: str | None) -> str:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
            return json.dumps({**base, "choices": [choice]})

        usage = _text_usage(request.prompt, len(words), self.reported_usage)
        await self._stream(
            send,
            behaviour,
            [chunk(word if i == 0 else f" {word}", None) for i, word in enumerate(words)],
            chunk("", _text_finish_reason(request, words)),
            json.dumps({**base, "choices": [], "usage": usage}) if request.include_usage else None,
        )

    async def _stream(
        self,
        send: Send,
        behaviour: _Behaviour,
        contents: list[str],
        finish: str,
        usage: str | None,
    ) -> None:
        """Server-sent events: the content chunks (the scripted extra chunk after the first),
        the finish chunk, the usage chunk (when given and not scripted away), `[DONE]`; cut or
        stalled as `behaviour` says."""
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        event = self._event_sender(send)

        for index, content in enumerate(contents):
            if behaviour.cut_after_chunks is not None and index >= behaviour.cut_after_chunks:
                await cut_connection()
            if index == behaviour.stall_after_chunks:
                await asyncio.sleep(behaviour.stall_seconds)
            await event(content)
            extra = behaviour.extra_chunk
            if index == 0 and extra is not None:
                await event(extra.decode() if isinstance(extra, bytes) else json.dumps(extra))
        if behaviour.cut_after_chunks is not None:
            await cut_connection()
        await event(finish)
        if usage is not None and not behaviour.omit_usage:
            await event(usage)
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _event_sender(self, send: Send) -> Callable[[str], Awaitable[None]]:
        """A stream's `data:` event writer, pausing `chunk_interval` between events."""
        first = True

        async def event(data: str) -> None:
            # One ASGI send per event: uvicorn writes each to the socket at once, so the client
            # sees chunks as they are produced rather than all at the end.
            nonlocal first
            if not first and self.chunk_interval > 0:
                await asyncio.sleep(self.chunk_interval)
            first = False
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {data}\n\n".encode(),
                    "more_body": True,
                }
            )

        return event

    async def _stream_chat(self, send: Send, request: _ChatRequest, behaviour: _Behaviour) -> None:
        words = reply_for(request.messages, request.max_tokens).split()
        base: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.model,
            "system_fingerprint": None,
        }
        if request.include_usage:
            # OpenAI: with include_usage every chunk carries `usage`, null except the last.
            base["usage"] = None
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", f"req_{uuid.uuid4().hex}".encode()),
                ],
            }
        )
        event = self._event_sender(send)

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return json.dumps({**base, "choices": [choice]})

        cut = behaviour.cut_after_chunks
        if not words:
            # Nothing to say (max_tokens=0): still announce the role, as OpenAI does.
            await event(chunk({"role": "assistant", "content": ""}, None))
        for index, word in enumerate(words):
            if cut is not None and index >= cut:
                await cut_connection()
            if index == behaviour.stall_after_chunks:
                await asyncio.sleep(behaviour.stall_seconds)
            delta: dict[str, Any] = {"content": word if index == 0 else f" {word}"}
            if index == 0:
                delta = {"role": "assistant", **delta}
            await event(chunk(delta, None))
            extra = behaviour.extra_chunk
            if index == 0 and extra is not None:
                await event(extra.decode() if isinstance(extra, bytes) else json.dumps(extra))
        if cut is not None:
            await cut_connection()
        await event(chunk({}, finish_reason_for(request.messages, request.max_tokens)))
        if request.include_usage and not behaviour.omit_usage:
            usage = _usage(request.messages, len(words), self.reported_usage)
            await event(json.dumps({**base, "choices": [], "usage": usage}))
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


_ROUTES: Final = frozenset(
    {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
    }
)


def _has_bearer_token(authorization: str) -> bool:
    scheme, _, token = authorization.strip().partition(" ")
    return scheme.lower() == "bearer" and bool(token.strip())


def _json_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _RequestError("The request body must be a JSON object.")
    return body


@dataclass(frozen=True)
class _ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None
    stream: bool
    include_usage: bool


def _chat_request(body: dict[str, Any]) -> _ChatRequest:
    """Validate what the fake relies on, with OpenAI's messages and `param` names."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _RequestError("you must provide a model parameter", "model")
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        raise _RequestError("'messages' must be a non-empty array of objects.", "messages")
    max_tokens: int | None = None
    # max_completion_tokens is the newer name; it wins when both are present.
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _RequestError(f"'{name}' must be a non-negative integer.", name)
        max_tokens = value
        break
    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    return _ChatRequest(model, messages, max_tokens, bool(body.get("stream")), include_usage)


def _usage(
    messages: Sequence[Mapping[str, Any]],
    completion_tokens: int,
    reported: tuple[int, int] | None = None,
) -> dict[str, int]:
    prompt, completion = reported or (count_prompt_tokens(messages), completion_tokens)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chat_completion(
    request: _ChatRequest, reported_usage: tuple[int, int] | None
) -> dict[str, Any]:
    reply = reply_for(request.messages, request.max_tokens)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "finish_reason": finish_reason_for(request.messages, request.max_tokens),
                "logprobs": None,
            }
        ],
        "usage": _usage(request.messages, len(reply.split()), reported_usage),
        "system_fingerprint": None,
    }


# A Mistral reasoning model's (Magistral's) `content`: a list of parts, its thinking and then
# its text, where OpenAI's is a string.
MISTRAL_REASONING_PARTS: list[dict[str, Any]] = [
    {"type": "thinking", "thinking": [{"type": "text", "text": "The capital of France"}]},
    {"type": "text", "text": "Paris."},
]


def chat_answer(
    message: dict[str, Any], *, finish_reason: Any = "stop", usage: Any = None
) -> dict[str, Any]:
    """A chat completion of one choice holding `message` (an assistant's unless it says), for
    `answer_next`: one of a shape a provider should not send, say. `usage` defaults to 3
    prompt tokens and 2 completion tokens."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", **message},
        "logprobs": {"content": [], "refusal": None},
        "finish_reason": finish_reason,
    }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake-small",
        "choices": [choice],
        "usage": usage or {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def tool_call(function: Any) -> dict[str, Any]:
    """A function tool call of a chat completion's message, `function` as it is given."""
    return {"id": "call_1", "type": "function", "function": function}


@dataclass(frozen=True)
class _CompletionRequest:
    model: str
    prompt: Any
    prompts: list[str]
    max_tokens: int
    stream: bool
    include_usage: bool
    echo: bool


def _completion_request(body: dict[str, Any]) -> _CompletionRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _RequestError("you must provide a model parameter", "model")
    prompts = _prompt_texts(body.get("prompt"))
    if not prompts:
        raise _RequestError("'prompt' must be a string, array of strings or tokens.", "prompt")
    max_tokens = body.get("max_tokens", LEGACY_DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise _RequestError("'max_tokens' must be a non-negative integer.", "max_tokens")
    stream_options = body.get("stream_options")
    return _CompletionRequest(
        model=model,
        prompt=body.get("prompt"),
        prompts=prompts,
        max_tokens=max_tokens,
        stream=bool(body.get("stream")),
        include_usage=isinstance(stream_options, dict)
        and bool(stream_options.get("include_usage")),
        echo=bool(body.get("echo")),
    )


def _text_finish_reason(request: _CompletionRequest, words: list[str]) -> str:
    full = text_reply_for(request.prompts[0], None).split()
    return "length" if len(full) > len(words) else "stop"


def _text_usage(
    prompt: Any, completion_tokens: int, reported: tuple[int, int] | None
) -> dict[str, int]:
    prompt_tokens, completion = reported or (count_text_tokens(prompt), completion_tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _text_completion(
    request: _CompletionRequest, reported_usage: tuple[int, int] | None
) -> dict[str, Any]:
    """One choice per prompt, as OpenAI answers a list of prompts."""
    replies = [text_reply_for(prompt, request.max_tokens) for prompt in request.prompts]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "text": (f"{prompt} " if request.echo else "") + reply,
                "index": index,
                "logprobs": None,
                "finish_reason": (
                    "length"
                    if len(text_reply_for(prompt, None).split()) > len(reply.split())
                    else "stop"
                ),
            }
            for index, (prompt, reply) in enumerate(zip(request.prompts, replies, strict=True))
        ],
        "usage": _text_usage(
            request.prompt, sum(len(reply.split()) for reply in replies), reported_usage
        ),
    }


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """Vectors as OpenAI answers them: floats, or with `encoding_format: base64` the
    little-endian float32 bytes in base64; `dimensions` keeps the first ones."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _RequestError("you must provide a model parameter", "model")
    given = body.get("input")
    texts = _prompt_texts(given)
    if not texts:
        raise _RequestError("'input' must be a string, array of strings or tokens.", "input")
    dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS)
    if not isinstance(dimensions, int) or not 1 <= dimensions <= EMBEDDING_DIMENSIONS:
        raise _RequestError(f"'dimensions' must be 1 to {EMBEDDING_DIMENSIONS}.", "dimensions")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _RequestError("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    tokens = count_text_tokens(given)

    def vector(text: str) -> Any:
        values = embedding_for(text)[:dimensions]
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        return values

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": vector(text)}
            for index, text in enumerate(texts)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "fake-provider"}
            for model in MODELS
        ],
    }


async def _send_json(
    send: Send, status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> None:
    await send_json(
        send, status, payload, headers, default_headers={"x-request-id": f"req_{uuid.uuid4().hex}"}
    )
