"""A fake LLM provider that speaks OpenAI's wire format over real HTTP, for the gateway's tests.

It answers deterministically (so tests can compute the exact usage and charge), records every
call, and plays scripted faults: an error status (with headers such as Retry-After), latency
before the first byte, a stream cut midway, a stream without its usage chunk.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tests.servers import ThreadedServer

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def count_prompt_tokens(messages: Any) -> int:
    """The fake's prompt token count: words of every message's text, plus 3 per message."""
    return sum(len(_text_of(message.get("content")).split()) + 3 for message in messages)


def reply_for(messages: Any, max_tokens: int | None) -> str:
    """The fake's deterministic reply, one token per word, cut to max_tokens words."""
    last_user = next(
        (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    words = ["Hello", "from", "the", "fake", "provider.", "You", "said:", *last_user.split()[:5]]
    return " ".join(words[:max_tokens] if max_tokens is not None else words)


@dataclass(frozen=True)
class RecordedCall:
    method: str
    path: str
    headers: dict[str, str]
    json: Any


@dataclass
class _Fault:
    status: int | None = None
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    cut_after_chunks: int | None = None
    omit_usage: bool = False


def _error_body(message: str, error_type: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


class FakeProvider:
    """An OpenAI-compatible upstream on 127.0.0.1 at a free port, served from a thread.

    `base_url` is what a catalog route points at. Scripted faults queue up and are consumed,
    one per request, in order.
    """

    def __init__(self, *, chunk_interval: float = 0.0) -> None:
        self.chunk_interval = chunk_interval
        # Every response waits this long before its first byte (on top of scripted delays).
        self.latency = 0.0
        # When set, every response reports these (prompt, completion) tokens as its usage.
        self.reported_usage: tuple[int, int] | None = None
        self.calls: list[RecordedCall] = []
        self._faults: deque[_Fault] = deque()
        self._lock = threading.Lock()
        self._server = ThreadedServer(self._app)

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> FakeProvider:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"{self._server.url}/v1"

    def reset(self) -> None:
        """Forget recorded calls, pending faults and settings changed by a test."""
        with self._lock:
            self.calls.clear()
            self._faults.clear()
            self.latency = 0.0
            self.reported_usage = None

    # --- scripting --------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` requests answer `status` (OpenAI error shape unless `body`)."""
        with self._lock:
            for _ in range(times):
                self._faults.append(_Fault(status=status, body=body, headers=headers or {}))

    def delay_next(self, seconds: float) -> None:
        """The next request waits `seconds` before its first byte."""
        with self._lock:
            self._faults.append(_Fault(delay_seconds=seconds))

    def cut_stream_after(self, chunks: int) -> None:
        """The next stream drops the connection after `chunks` content chunks."""
        with self._lock:
            self._faults.append(_Fault(cut_after_chunks=chunks))

    def omit_usage_next(self) -> None:
        """The next stream ends without a usage chunk, even when include_usage was asked."""
        with self._lock:
            self._faults.append(_Fault(omit_usage=True))

    # --- the ASGI application ---------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
            if scope["method"] == "POST":
                await _send_json(
                    send, 400, _error_body("Invalid JSON body.", "invalid_request_error")
                )
                return
        with self._lock:
            self.calls.append(RecordedCall(scope["method"], scope["path"], headers, body))
            fault = self._faults.popleft() if self._faults else _Fault()

        if fault.delay_seconds or self.latency:
            await asyncio.sleep(fault.delay_seconds + self.latency)
        if fault.status is not None:
            error = fault.body or _error_body(f"Scripted failure {fault.status}.", "server_error")
            await _send_json(send, fault.status, error, fault.headers)
            return
        if not headers.get("authorization", "").removeprefix("Bearer ").strip():
            await _send_json(
                send,
                401,
                _error_body("Missing API key.", "invalid_request_error", "invalid_api_key"),
            )
            return

        route = (scope["method"], scope["path"])
        if route == ("POST", "/v1/chat/completions") and isinstance(body, dict):
            if body.get("stream"):
                await self._stream_chat(send, body, fault)
            else:
                await _send_json(send, 200, _chat_completion(body, self.reported_usage))
        elif route == ("POST", "/v1/embeddings") and isinstance(body, dict):
            await _send_json(send, 200, _embeddings(body))
        elif route == ("GET", "/v1/models"):
            models = [{"id": "fake-small", "object": "model", "created": 0, "owned_by": "fake"}]
            await _send_json(send, 200, {"object": "list", "data": models})
        else:
            await _send_json(
                send, 404, _error_body(f"Unknown path {scope['path']}", "invalid_request_error")
            )

    async def _stream_chat(self, send: Send, body: dict[str, Any], fault: _Fault) -> None:
        messages = body.get("messages") or []
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        words = reply_for(messages, max_tokens).split()
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model"),
            "system_fingerprint": None,
        }
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

        async def event(payload: Any) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await send(
                {
                    "type": "http.response.body",
                    "body": f"data: {data}\n\n".encode(),
                    "more_body": True,
                }
            )
            if self.chunk_interval:
                await asyncio.sleep(self.chunk_interval)

        for index, word in enumerate(words):
            if fault.cut_after_chunks is not None and index >= fault.cut_after_chunks:
                # Abruptly end the response mid-stream: uvicorn closes the connection.
                raise ConnectionAbortedError("scripted stream cut")
            delta: dict[str, Any] = {"content": word if index == 0 else f" {word}"}
            if index == 0:
                delta["role"] = "assistant"
            await event(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
                    ],
                }
            )
        finish = "length" if max_tokens is not None and len(words) >= max_tokens else "stop"
        await event(
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None}],
            }
        )
        if (body.get("stream_options") or {}).get("include_usage") and not fault.omit_usage:
            await event({**base, "choices": [], "usage": _usage(messages, len(words))})
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _usage(messages: Any, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = count_prompt_tokens(messages)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _chat_completion(
    body: dict[str, Any], reported_usage: tuple[int, int] | None = None
) -> dict[str, Any]:
    messages = body.get("messages") or []
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    reply = reply_for(messages, max_tokens)
    words = len(reply.split())
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply, "refusal": None},
                "finish_reason": "length"
                if max_tokens is not None and words >= max_tokens
                else "stop",
                "logprobs": None,
            }
        ],
        "usage": (
            _usage(messages, words)
            if reported_usage is None
            else {
                "prompt_tokens": reported_usage[0],
                "completion_tokens": reported_usage[1],
                "total_tokens": sum(reported_usage),
            }
        ),
        "system_fingerprint": None,
    }


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [((len(str(text)) + k) % 7) / 7 for k in range(8)],
        }
        for i, text in enumerate(texts)
    ]
    tokens = sum(len(str(text).split()) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": body.get("model"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def _send_json(
    send: Send, status: int, payload: Any, headers: dict[str, str] | None = None
) -> None:
    raw = json.dumps(payload).encode()
    header_list = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
    ]
    header_list += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": header_list})
    await send({"type": "http.response.body", "body": raw})
