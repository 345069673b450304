"""The interface every provider adapter implements, and what it returns."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from gateway.errors import UnreadableAnswer
from gateway.selectors import RouteEntry

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class TokenUsage:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0  # of input_tokens, read from the provider's prompt cache
    cache_write_input_tokens: int = 0  # of input_tokens, written to the provider's prompt cache
    # True when the provider reported the figures; False when the gateway estimated them.
    reported: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    body: dict[str, Any]  # an OpenAI chat.completion object
    usage: TokenUsage


@dataclass(frozen=True, slots=True)
class UpstreamStream:
    """An upstream stream that answered 200: its chunks are still to be read.

    `chunks` yields OpenAI `chat.completion.chunk` objects in order and ends after the
    provider's end of stream; it raises UpstreamStreamBroken when the stream breaks midway.
    `close` must be awaited once, however the stream ends: it frees the upstream connection.
    """

    chunks: AsyncIterator[dict[str, Any]]
    close: Callable[[], Awaitable[None]]


class ProviderAdapter(Protocol):
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """Send an OpenAI-shaped chat request to the route's provider and return its answer.

        Raises UpstreamFailed (provider unreachable, 5xx, 401/403, unreadable answer) or
        InvalidRequest (the provider refused the request itself as invalid).
        """
        ...


@runtime_checkable
class StreamingAdapter(Protocol):
    """An adapter that can also stream; the view asks with isinstance() before streaming."""

    async def chat_completion_stream(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamStream:
        """Open a streamed chat request to the route's provider, up to its first byte.

        The body asks for a stream and for the usage chunk. Raises, before anything reaches
        the client, what `chat_completion` raises; failures after that come from the chunks.
        """
        ...


@runtime_checkable
class CompletionAdapter(Protocol):
    """An adapter whose provider offers OpenAI's legacy `/completions` (prompt in, text out)."""

    async def completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """Send a legacy completion request; raises as `chat_completion` does."""
        ...

    async def completion_stream(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamStream:
        """Open a streamed legacy completion, up to its first byte; its chunks are OpenAI
        `text_completion` objects, the last one the usage chunk."""
        ...


@runtime_checkable
class EmbeddingAdapter(Protocol):
    """An adapter whose provider offers OpenAI-shaped `/embeddings`."""

    async def embeddings(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """Send an embeddings request; the usage has input tokens only."""
        ...


def shaped(value: Any, kind: type[_T], *, default: _T | None = None) -> _T:
    """A value of a provider's answer read where its API documents a `kind` (dict, list, str,
    int): the value, or `default` when the value is absent or null and the field may be.
    Anything else means the answer is not the API's and cannot be read: UnreadableAnswer (a
    route failure, which fails over; after a stream's first byte it ends the stream, as a break
    does). The adapters read an answer's structure through this, one isinstance per value
    they read anyway, so that an unexpected shape never surfaces as a KeyError or TypeError
    (a 500, or a stream ended as the gateway's own failure); usage figures are read with
    `token_count` instead, since unreadable usage is still an answer, charged an estimate."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if value is None and default is not None:
        return default
    raise UnreadableAnswer()


def content_text(content: Any, *, thinking: bool = False) -> str:
    """The text of an OpenAI-style message's or delta's `content`: the string itself, or the
    text parts of a list of parts, which Mistral's reasoning models (Magistral) answer as
    `[{"type": "thinking", "thinking": [{"type": "text", "text": …}]}, {"type": "text", …}]`.
    Their thinking is left out (an answer's text), or kept (`thinking`: what an estimate of
    the tokens generated counts). "" for anything else, null included."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif thinking and part.get("type") == "thinking":
            texts.append(content_text(part.get("thinking")))
    return "".join(texts)


def readable_content(content: Any) -> bool:
    """Whether an OpenAI-style `content` is one of its readable shapes: text, null, or a
    list of part objects (Mistral's reasoning models; `content_text` reads them)."""
    return (
        content is None
        or type(content) is str
        or (isinstance(content, list) and all(isinstance(part, dict) for part in content))
    )


# The most tokens a usage record's count holds (a 32-bit integer column), thousands of times
# any model's context: a provider reporting more is reporting nonsense.
MAX_TOKEN_COUNT = 2**31 - 1


def token_count(value: Any) -> int | None:
    """A token count as a provider reports it: a whole number from 0 to MAX_TOKEN_COUNT
    (absent or null: 0; a float such as 3.0 too). None for anything else: the usage it is
    part of cannot be billed, and the request is charged an estimate instead
    (`billable_usage`)."""
    if value is None:
        return 0
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKEN_COUNT:
        return None
    return value


def billable_usage(
    *,
    input_tokens: int | None,
    output_tokens: int | None,
    cached_input_tokens: int | None = 0,
    cache_write_input_tokens: int | None = 0,
) -> TokenUsage | None:
    """The reported usage from counts read with `token_count`; None when one was unreadable or
    the cache counts exceed the prompt. Billing such figures failed after the provider had
    answered (the client got a 500, and no usage record was written)."""
    if (
        input_tokens is None
        or output_tokens is None
        or cached_input_tokens is None
        or cache_write_input_tokens is None
        or cached_input_tokens + cache_write_input_tokens > input_tokens
    ):
        return None
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached_input_tokens,
        cache_write_input_tokens=cache_write_input_tokens,
    )


def reported_usage(usage: Any) -> TokenUsage | None:
    """The usage an OpenAI-shaped `usage` object reports, or None when it reports none (or
    none that can be billed)."""
    if not isinstance(usage, dict) or not isinstance(usage.get("prompt_tokens"), int):
        return None
    details = usage.get("prompt_tokens_details") or {}
    if not isinstance(details, dict):
        return None
    return billable_usage(
        input_tokens=token_count(usage["prompt_tokens"]),
        output_tokens=token_count(usage.get("completion_tokens")),
        cached_input_tokens=token_count(details.get("cached_tokens")),
        # Not OpenAI's: the translating adapters report prompt-cache writes here (as
        # OpenRouter does), so a stream bills them at their own price.
        cache_write_input_tokens=token_count(details.get("cache_write_tokens")),
    )


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token) for when a provider reports none."""
    return (len(text) + 3) // 4


def estimate_prompt_tokens(prompt: Any) -> int:
    """The prompt tokens charged when a provider reports none: the prompt as JSON, estimated."""
    return estimate_tokens(json.dumps(prompt))


def estimated_usage(*, prompt: Any, completion: str) -> TokenUsage:
    """The usage charged when a provider reports none, labelled as estimated."""
    return TokenUsage(
        input_tokens=estimate_prompt_tokens(prompt),
        output_tokens=estimate_tokens(completion),
        reported=False,
    )


def openai_usage(usage: TokenUsage) -> dict[str, Any]:
    """OpenAI's `usage` object for what a translating adapter measured (prompt tokens in all,
    cache reads as `cached_tokens`, cache writes as `cache_write_tokens`)."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_input_tokens,
            "cache_write_tokens": usage.cache_write_input_tokens,
        },
    }
