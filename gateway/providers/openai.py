"""OpenAI-compatible providers (OpenAI, Mistral, Groq, vLLM, Ollama, …): the body passes as is."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx

from gateway.errors import InvalidRequest, UpstreamFailed
from gateway.outbound import client
from gateway.providers.base import TokenUsage, UpstreamReply, estimate_tokens
from gateway.selectors import RouteEntry

logger = logging.getLogger(__name__)

# Upstream statuses that mean the request itself was refused; everything else is our failure.
_CLIENT_ERRORS = frozenset({400, 404, 413, 422})


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


def _upstream_error_message(response: httpx.Response) -> str:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"The provider refused the request (HTTP {response.status_code})."
    return f"The provider refused the request: {str(message)[:500]}"


class OpenAIAdapter:
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST the body to `{base_url}/chat/completions` with the route's upstream model."""
        request = {**body, "model": route.upstream_model}
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        try:
            response = await client().post(
                f"{route.base_url}/chat/completions", json=request, headers=headers
            )
        except httpx.HTTPError as exc:
            logger.warning("provider %s unreachable: %s", route.provider, type(exc).__name__)
            raise UpstreamFailed("The provider could not be reached.") from None
        if response.status_code in _CLIENT_ERRORS:
            raise InvalidRequest(_upstream_error_message(response))
        if response.status_code != 200:
            logger.warning("provider %s answered HTTP %s", route.provider, response.status_code)
            raise UpstreamFailed(f"The provider failed (HTTP {response.status_code}).")
        try:
            reply = response.json()
        except ValueError:
            raise UpstreamFailed("The provider's answer was not valid JSON.") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            raise UpstreamFailed("The provider's answer was not a chat completion.")
        return UpstreamReply(body=reply, usage=_usage_from(reply, request))
