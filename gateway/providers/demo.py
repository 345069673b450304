"""The built-in demo provider: answers offline, so `make run` works with no provider secrets.

It echoes the last user message back with deterministic, word-counted usage.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from gateway.providers.base import TokenUsage, UpstreamReply
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
