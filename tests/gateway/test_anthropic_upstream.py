"""POST /v1/chat/completions to a model served by Anthropic: what only Anthropic has (its own SDK
reads the fake, max_tokens is required, prompt-cache writes are billed, error events mid-stream,
content with no Messages API counterpart). The scenarios Gemini shares are in
test_translated_upstreams.py."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest

from billing.models import UsageRecord
from billing.money import usage_cost_usd
from billing.selectors import wallet_balance_usd
from tests.factories import make_key, make_org
from tests.fakes.anthropic import count_input_tokens
from tests.gateway.metering import sdk
from tests.gateway.upstreams import (
    ANTHROPIC,
    MESSAGES,
    assert_an_unreadable_answer_fails_over,
    assert_an_unreadable_event_ends_the_stream,
    translated_upstream_fixtures,
)

upstream, _fake_server, fake, routed_to_fake, two_deployments = translated_upstream_fixtures(
    ANTHROPIC
)


def test_the_fake_is_read_by_the_official_anthropic_sdk(fake):
    """What the gateway is tested against parses as Anthropic's own types."""
    client = anthropic.Anthropic(
        base_url=fake.base_url.removesuffix("/v1"), api_key=ANTHROPIC.secret, max_retries=0
    )

    message = client.messages.create(
        model=ANTHROPIC.upstream_model,
        max_tokens=20,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}],
    )

    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("get_weather", {"city": "Paris"})
    assert message.usage.input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(
            base_url=fake.base_url.removesuffix("/v1"), api_key="wrong", max_retries=0
        ).messages.create(
            model=ANTHROPIC.upstream_model,
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
        )


def test_without_max_tokens_the_models_cap_is_sent(gateway_url, routed_to_fake, fake):
    _, key = make_key(make_org())

    sdk(gateway_url, key).chat.completions.create(model=ANTHROPIC.model, messages=MESSAGES)

    assert fake.calls[0].json["max_tokens"] == 4096  # the catalog's default cap


def test_prompt_cache_reads_and_writes_are_billed_at_their_own_prices(
    gateway_url, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.cache_read_input_tokens = 6
    fake.cache_creation_input_tokens = 4

    completion = sdk(gateway_url, key).chat.completions.create(
        model=ANTHROPIC.model, messages=MESSAGES, max_tokens=50
    )

    [reply] = fake.replies
    # The fake reports 13 prompt tokens: 6 read from the cache, 4 written to it, 3 uncached.
    assert reply["usage"]["input_tokens"] == 3
    assert reply["usage"]["cache_read_input_tokens"] == 6
    assert reply["usage"]["cache_creation_input_tokens"] == 4
    prompt_tokens = count_input_tokens(fake.calls[0].json)
    output_tokens = reply["usage"]["output_tokens"]
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 6
    record = UsageRecord.objects.get()
    assert (
        record.input_tokens,
        record.cached_input_tokens,
        record.cache_write_input_tokens,
        record.output_tokens,
    ) == (prompt_tokens, 6, 4, output_tokens)
    expected_cost = usage_cost_usd(
        price=ANTHROPIC.price,
        input_tokens=prompt_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=6,
        cache_write_input_tokens=4,
    )
    assert record.cost_usd == expected_cost
    # 3 × 3.00 + 6 × 0.30 + 4 × 3.75 per 1M for the prompt.
    assert expected_cost == (Decimal("25.80") + output_tokens * Decimal(15)) / 1_000_000
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - expected_cost


def test_a_request_that_cannot_be_translated_gets_400_and_never_leaves(
    gateway_url, routed_to_fake, fake
):
    _, key = make_key(make_org())
    audio: list[Any] = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway_url, key).chat.completions.create(
            model=ANTHROPIC.model, messages=[{"role": "user", "content": audio}]
        )

    assert caught.value.param == "messages[0].content[0]"
    assert fake.calls == []
    assert not UsageRecord.objects.exists()


def test_an_error_event_midway_ends_the_stream_and_settles_interrupted(
    gateway_url, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.error_stream_after(2)

    with pytest.raises(openai.APIError) as caught:
        list(
            sdk(gateway_url, key).chat.completions.create(
                model=ANTHROPIC.model, messages=MESSAGES, max_tokens=50, stream=True
            )
        )

    # Our words, not the provider's.
    assert caught.value.message == "The provider failed in the middle of the stream."
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


# --- answers not of the Messages API's shape --------------------------------------------------


def message(*content: Any) -> dict[str, Any]:
    """A Message with `content`, well formed otherwise."""
    return {
        "id": "msg_0123",
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC.upstream_model,
        "content": list(content),
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 2},
    }


TOOL_USE = {"type": "tool_use", "id": "toolu_0123", "name": "get_weather", "input": {}}


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param([message()], id="not_an_object"),
        pytest.param({**message(), "content": "Hello"}, id="content_not_a_list"),
        pytest.param(message("Hello"), id="block_not_an_object"),
        pytest.param(message({"text": "Hello"}), id="block_without_type"),
        pytest.param(message({"type": "text", "text": ["Hello"]}), id="text_not_a_string"),
        pytest.param(message({**TOOL_USE, "name": None}), id="tool_use_without_name"),
        pytest.param(message({**TOOL_USE, "id": 7}), id="tool_use_id_a_number"),
        pytest.param(message({**TOOL_USE, "input": "Paris"}), id="tool_input_not_an_object"),
    ],
)
def test_an_answer_not_of_the_messages_shape_fails_over(gateway_url, two_deployments, fake, answer):
    assert_an_unreadable_answer_fails_over(gateway_url, ANTHROPIC, fake, answer)


@pytest.mark.parametrize(
    "event",
    [
        pytest.param("Hello", id="not_an_object"),
        pytest.param({"index": 0, "delta": {"type": "text_delta"}}, id="without_type"),
        pytest.param({"type": "message_start", "message": "Hello"}, id="message_a_string"),
        pytest.param(
            {"type": "content_block_start", "index": 1, "content_block": [TOOL_USE]},
            id="block_a_list",
        ),
        pytest.param(
            {"type": "content_block_start", "index": [1], "content_block": TOOL_USE},
            id="index_a_list",
        ),
        pytest.param(
            {"type": "content_block_delta", "index": 0, "delta": " more"}, id="delta_a_string"
        ),
        pytest.param(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
            id="text_a_number",
        ),
        pytest.param(
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": "lots"},
            id="usage_a_string",
        ),
        pytest.param({"type": "error", "error": "overloaded"}, id="error_a_string"),
    ],
)
def test_a_stream_event_not_of_the_messages_shape_ends_the_stream_and_settles(
    gateway_url, routed_to_fake, fake, event
):
    assert_an_unreadable_event_ends_the_stream(gateway_url, ANTHROPIC, fake, event)
