"""The built-in demo provider: answers offline, so `make run` works with no provider secrets.

It echoes the last user message back with deterministic, word-counted usage.
"""

from __future__ import annotations

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
