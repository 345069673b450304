"""Steps 2 and 5 of the request path: cap what a request may generate and bound its cost.

The reservation must cover the worst case, or concurrent requests could together spend more
than the wallet holds. Both bounds below are upper bounds, not guesses:
- prompt: no tokenizer emits more tokens than the UTF-8 bytes it reads, and the body's bytes
  include every message's text plus its JSON framing (which covers per-message overhead);
  images are not text, so each image part adds the model's `image_input_tokens` (the most its
  provider bills for one image, from the catalog); tools make the provider add a system prompt
  of its own, which the body does not hold (TOOLS_TOKEN_ALLOWANCE);
- completion: the request's max_tokens, capped at the model's max_output_tokens, and that cap
  is what the upstream is sent, so it cannot generate more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequest
from gateway.selectors import ModelEntry

# Tokens reserved when a request offers tools (or legacy functions): the provider prefixes a
# tool-use system prompt the body does not hold, billed as input (Anthropic documents up to
# 530 tokens of it, per model and tool_choice).
TOOLS_TOKEN_ALLOWANCE = 1_000


@dataclass(frozen=True, slots=True)
class WorstCase:
    input_tokens: int
    output_tokens: int


def _count_image_parts(messages: Any) -> int:
    count = 0
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(
                1
                for part in content
                if isinstance(part, dict)
                and part.get("type") in {"image_url", "image", "input_image"}
            )
    return count


def cap_max_tokens(
    body: dict[str, Any], model: ModelEntry, *, default: int | None = None
) -> tuple[dict[str, Any], int]:
    """The body to forward with its completion limit capped, and that limit.

    Takes the limit from the field the client set (`max_completion_tokens`, the newer name,
    when it set both); when it set neither, sets `max_tokens` to `default` (the API's own
    default, such as the legacy completions' 16) or else the model's cap, so the upstream
    stops there. When both are set, both are sent as the limit: a provider may read either
    (llama.cpp and older servers know only `max_tokens`), and the hold covers this one.
    """
    given = [name for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None]
    field = given[0] if given else "max_tokens"
    requested = body.get(field)
    if requested is None:
        limit = min(default or model.max_output_tokens, model.max_output_tokens)
    elif isinstance(requested, int) and not isinstance(requested, bool) and requested >= 1:
        limit = min(requested, model.max_output_tokens)
    else:
        raise InvalidRequest(f"'{field}' must be a positive integer.", param=field)
    return {**body, **dict.fromkeys(given or [field], limit)}, limit


def _choices(body: dict[str, Any]) -> int:
    """How many completions the request generates: `n`, or a legacy `best_of` above it, for
    each prompt of a legacy list of prompts."""
    counts = [body.get(name) for name in ("n", "best_of")]
    per_prompt = max([1, *(count for count in counts if isinstance(count, int))])
    return per_prompt * _prompts(body.get("prompt"))


def _prompts(prompt: Any) -> int:
    """How many prompts a legacy `prompt` holds: a list of strings or of token arrays is one
    each (each gets its own `n` choices); a string or one token array is one."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        return len(prompt)
    return 1


def worst_case(
    *, body: dict[str, Any], body_bytes: int, output_limit: int, model: ModelEntry
) -> WorstCase:
    """The most tokens this request can be billed for: every image may cost the model's
    `image_input_tokens`, and every choice (`n` for each prompt) the whole completion limit."""
    images = _count_image_parts(body.get("messages"))
    tools = any(body.get(name) for name in ("tools", "functions"))
    return WorstCase(
        input_tokens=body_bytes + images * model.image_input_tokens + tools * TOOLS_TOKEN_ALLOWANCE,
        output_tokens=output_limit * _choices(body),
    )
