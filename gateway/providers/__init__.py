"""Provider adapters: one module per provider kind behind the `ProviderAdapter` interface.

An adapter takes an OpenAI-shaped request body and answers an OpenAI-shaped response with
the usage it measured; translation to and from the provider's own wire format happens inside.
"""

from __future__ import annotations

from gateway.providers.anthropic import AnthropicAdapter
from gateway.providers.base import ProviderAdapter, TokenUsage, UpstreamReply
from gateway.providers.demo import DemoAdapter
from gateway.providers.gemini import GeminiAdapter
from gateway.providers.openai import OpenAIAdapter

_ADAPTERS: dict[str, ProviderAdapter] = {
    "openai": OpenAIAdapter(),
    "anthropic": AnthropicAdapter(),
    "gemini": GeminiAdapter(),
    "demo": DemoAdapter(),
}


def adapter_for(kind: str) -> ProviderAdapter | None:
    """The adapter for a provider kind, or None when this build cannot serve that kind yet."""
    return _ADAPTERS.get(kind)


__all__ = ["ProviderAdapter", "TokenUsage", "UpstreamReply", "adapter_for"]
