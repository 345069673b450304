"""The built-in demo provider: answers offline, so `make run` works with no provider secrets.

It echoes the last user message (or the legacy prompt) back with deterministic, word-counted
usage, and embeds text as vectors derived from its SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from gateway.providers.base import TokenUsage, UpstreamReply, UpstreamStream
from gateway.selectors import RouteEntry


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


class DemoAdapter:
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """Answer "Demo reply to: <last user message>", counting one token per word."""
        messages = [m for m in body.get("messages", []) if isinstance(m, dict)]
        last_user = next(
            (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
            "",
        )
        content = f"Demo reply to: {last_user}".strip()
        input_tokens = sum(len(_text_of(m.get("content")).split()) + 3 for m in messages)
        output_tokens = len(content.split())
        reply = {
            "id": f"chatcmpl-demo-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": route.upstream_model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }
        return UpstreamReply(
            body=reply, usage=TokenUsage(input_tokens=input_tokens, output_tokens=output_tokens)
        )

    async def chat_completion_stream(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamStream:
        """The same answer as `chat_completion`, one word a chunk, then the usage chunk."""
        reply = await self.chat_completion(route=route, body=body, secret=secret)
        return UpstreamStream(chunks=_chunks_of(reply), close=_nothing_to_close)

    async def completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """Answer a legacy completion as a chat whose user message is the (first) prompt."""
        prompts = _prompts(body.get("prompt"))
        chat = await self.chat_completion(
            route=route,
            body={"messages": [{"role": "user", "content": prompts[0] if prompts else ""}]},
            secret=secret,
        )
        message = chat.body["choices"][0]["message"]["content"]
        reply = {
            **chat.body,
            "id": f"cmpl-demo-{uuid.uuid4().hex}",
            "object": "text_completion",
            "choices": [{"text": message, "index": 0, "logprobs": None, "finish_reason": "stop"}],
        }
        return UpstreamReply(body=reply, usage=chat.usage)

    async def completion_stream(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamStream:
        """The same answer as `completion`, one word a chunk, then the usage chunk."""
        reply = await self.completion(route=route, body=body, secret=secret)
        return UpstreamStream(chunks=_text_chunks_of(reply), close=_nothing_to_close)

    async def embeddings(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """Eight numbers per input (or `dimensions`, at most 8), as floats or base64."""
        texts = _prompts(body.get("input"))
        dimensions = min(int(body.get("dimensions") or _DEMO_DIMENSIONS), _DEMO_DIMENSIONS)
        tokens = sum(len(text.split()) for text in texts)
        data = []
        for index, text in enumerate(texts):
            digest = hashlib.sha256(text.encode()).digest()
            values = [byte / 127.5 - 1.0 for byte in digest[:dimensions]]
            vector: Any = values
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        reply = {
            "object": "list",
            "data": data,
            "model": route.upstream_model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return UpstreamReply(body=reply, usage=TokenUsage(input_tokens=tokens, output_tokens=0))


_DEMO_DIMENSIONS = 8


def _prompts(value: Any) -> list[str]:
    """A legacy `prompt` or an embeddings `input` as texts (a token array as its ids)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        return [" ".join(str(item) for item in value)]
    if isinstance(value, list):
        return [text for item in value for text in _prompts(item)]
    return []


async def _text_chunks_of(reply: UpstreamReply) -> AsyncIterator[dict[str, Any]]:
    base = {key: reply.body[key] for key in ("id", "created", "model", "object")}
    words = str(reply.body["choices"][0]["text"]).split()
    for index, word in enumerate(words):
        text = word if index == 0 else f" {word}"
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": None}
        yield {**base, "choices": [choice]}
    yield {**base, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}]}
    yield {**base, "choices": [], "usage": reply.body["usage"]}


async def _chunks_of(reply: UpstreamReply) -> AsyncIterator[dict[str, Any]]:
    base = {key: reply.body[key] for key in ("id", "created", "model")}
    base["object"] = "chat.completion.chunk"
    words = str(reply.body["choices"][0]["message"]["content"]).split()
    for index, word in enumerate(words):
        delta: dict[str, Any] = {"content": word if index == 0 else f" {word}"}
        if index == 0:
            delta["role"] = "assistant"
        yield {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    yield {**base, "choices": [], "usage": reply.body["usage"]}


async def _nothing_to_close() -> None:
    return None
