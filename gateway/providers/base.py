"""The interface every provider adapter implements, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from gateway.selectors import RouteEntry


@dataclass(frozen=True, slots=True)
class TokenUsage:
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    # True when the provider reported the figures; False when the gateway estimated them.
    reported: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    body: dict[str, Any]  # an OpenAI chat.completion object
    usage: TokenUsage


class ProviderAdapter(Protocol):
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """Send an OpenAI-shaped chat request to the route's provider and return its answer.

        Raises UpstreamFailed (provider unreachable, 5xx, 401/403, unreadable answer) or
        InvalidRequest (the provider refused the request itself as invalid).
        """
        ...


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token) for when a provider reports none."""
    return (len(text) + 3) // 4
