"""OpenAI-compatible providers (OpenAI, Mistral, Groq, vLLM, Ollama, …): the body passes as is."""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import UpstreamFailed
from gateway.providers.base import TokenUsage, UpstreamReply, estimate_tokens
from gateway.providers.http import post_json
from gateway.selectors import RouteEntry


def _usage_from(body: dict[str, Any], request: dict[str, Any]) -> TokenUsage:
    usage = body.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        details = usage.get("prompt_tokens_details") or {}
        return TokenUsage(
            input_tokens=usage["prompt_tokens"],
            output_tokens=int(usage.get("completion_tokens") or 0),
            cached_input_tokens=int(details.get("cached_tokens") or 0),
        )
    prompt = json.dumps(request.get("messages", []))
    completion = "".join(
        str((choice.get("message") or {}).get("content") or "")
        for choice in body.get("choices", [])
    )
    return TokenUsage(
        input_tokens=estimate_tokens(prompt),
        output_tokens=estimate_tokens(completion),
        reported=False,
    )


class OpenAIAdapter:
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST the body to `{base_url}/chat/completions` with the route's upstream model."""
        request = {**body, "model": route.upstream_model}
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        reply = await post_json(
            route=route, url=f"{route.base_url}/chat/completions", payload=request, headers=headers
        )
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            raise UpstreamFailed("The provider's answer was not a chat completion.")
        return UpstreamReply(body=reply, usage=_usage_from(reply, request))
