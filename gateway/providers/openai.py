"""OpenAI-compatible providers (OpenAI, Mistral, Groq, vLLM, Ollama, …): the body passes as is."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from gateway.errors import InvalidRequest, UpstreamFailed, UpstreamStreamBroken
from gateway.outbound import client
from gateway.providers.base import (
    TokenUsage,
    UpstreamReply,
    UpstreamStream,
    estimated_usage,
    reported_usage,
)
from gateway.providers.http import (
    CLIENT_ERRORS,
    post_json,
    refusal_message,
    route_timeout,
    status_failure,
)
from gateway.selectors import RouteEntry

logger = logging.getLogger(__name__)


def _usage_from(body: dict[str, Any], request: dict[str, Any]) -> TokenUsage:
    usage = reported_usage(body.get("usage"))
    if usage is not None:
        return usage
    completion = "".join(
        str((choice.get("message") or {}).get("content") or "")
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
        return TokenUsage(input_tokens=usage["prompt_tokens"], output_tokens=0)
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


async def _sse_chunks(route: RouteEntry, response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a chat completion's server-sent events, up to `[DONE]`."""
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments (": keep-alive"), `event:` lines
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                raise UpstreamStreamBroken("The provider's stream was not readable.") from None
            if not isinstance(chunk, dict) or "error" in chunk:
                # An error reported inside the stream: its text is the provider's, not ours
                # to pass on (it may name internals), so the client gets our own message.
                logger.warning("provider %s reported an error mid-stream", route.provider)
                raise UpstreamStreamBroken("The provider failed in the middle of the stream.")
            yield chunk
    except httpx.HTTPError as exc:
        logger.warning("provider %s stream broke: %s", route.provider, type(exc).__name__)
        raise UpstreamStreamBroken("The provider's stream broke off.") from None


class OpenAIAdapter:
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST the body to `{base_url}/chat/completions` with the route's upstream model."""
        request = {**body, "model": route.upstream_model}
        reply = await post_json(
            route=route,
            url=f"{route.base_url}/chat/completions",
            payload=request,
            headers=_headers(secret),
        )
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            raise UpstreamFailed("The provider's answer was not a chat completion.")
        return UpstreamReply(body=reply, usage=_usage_from(reply, request))

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
        request = {**body, "model": route.upstream_model}
        reply = await post_json(
            route=route,
            url=f"{route.base_url}/completions",
            payload=request,
            headers=_headers(secret),
        )
        if not isinstance(reply, dict) or not isinstance(reply.get("choices"), list):
            raise UpstreamFailed("The provider's answer was not a completion.")
        return UpstreamReply(body=reply, usage=_completion_usage_from(reply, request))

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
        request = {**body, "model": route.upstream_model}
        reply = await post_json(
            route=route,
            url=f"{route.base_url}/embeddings",
            payload=request,
            headers=_headers(secret),
        )
        if not isinstance(reply, dict) or not isinstance(reply.get("data"), list):
            raise UpstreamFailed("The provider's answer was not a list of embeddings.")
        return UpstreamReply(body=reply, usage=_embedding_usage_from(reply, request))


async def _open_stream(
    route: RouteEntry, path: str, request: dict[str, Any], secret: str
) -> UpstreamStream:
    """POST a streamed request and return once the provider answered 200, its events unread."""
    outbound = client()
    try:
        # Each read of the body may wait a little over the idle timeout (the relay's own check,
        # gateway/streaming.py `paced`, is the one that ends a silent stream); the wait for the
        # first byte is bounded here, whatever the transport does with read timeouts.
        # asyncio.timeout, not wait_for: wait_for opens the stream in a task of its own, and
        # streams opened that way lost their relayed chunks when cut midway (test_streaming.py).
        async with asyncio.timeout(route.first_byte_timeout_seconds):
            response = await outbound.send(
                outbound.build_request(
                    "POST",
                    f"{route.base_url}{path}",
                    json=request,
                    headers=_headers(secret),
                    timeout=route_timeout(route, read_seconds=route.idle_timeout_seconds + 1),
                ),
                stream=True,
            )
    except TimeoutError:
        logger.warning("provider %s: no first byte in time", route.provider)
        raise UpstreamFailed("The provider did not answer in time.", retryable=True) from None
    except httpx.HTTPError as exc:
        logger.warning("provider %s unreachable: %s", route.provider, type(exc).__name__)
        raise UpstreamFailed("The provider could not be reached.", retryable=True) from None
    if response.status_code != 200:
        try:
            await response.aread()  # the refusal's explanation, for a 4xx
        except httpx.HTTPError:
            raise UpstreamFailed("The provider could not be reached.", retryable=True) from None
        finally:
            await response.aclose()
        if response.status_code in CLIENT_ERRORS:
            raise InvalidRequest(refusal_message(response))
        raise status_failure(route, response.status_code, response=response)
    return UpstreamStream(chunks=_sse_chunks(route, response), close=response.aclose)
