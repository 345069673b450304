"""POST /v1/chat/completions to a model served by Gemini: what only Gemini has (thought
signatures on function calls, thinking billed as output). The scenarios Anthropic shares are in
test_translated_upstreams.py."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from billing.models import UsageRecord
from billing.money import usage_cost_usd
from billing.selectors import wallet_balance_usd
from tests.factories import make_key, make_org
from tests.fakes.gemini import count_prompt_tokens
from tests.gateway.metering import sdk
from tests.gateway.upstreams import (
    GEMINI,
    MESSAGES,
    WEATHER_TOOL,
    assert_an_unreadable_answer_fails_over,
    assert_an_unreadable_event_ends_the_stream,
    translated_upstream_fixtures,
)

upstream, _fake_server, fake, routed_to_fake, two_deployments = translated_upstream_fixtures(GEMINI)


def test_a_function_call_sent_back_without_its_signature_is_refused_with_the_reason(
    gateway_url, routed_to_fake, fake
):
    _, key = make_key(make_org())
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_from_elsewhere",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_from_elsewhere", "content": "18 degrees"},
    ]

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway_url, key).chat.completions.create(
            model=GEMINI.model, messages=messages, tools=[WEATHER_TOOL]
        )

    assert "thought_signature" in caught.value.message


def test_thinking_is_billed_as_output_and_cached_tokens_at_the_cached_price(
    gateway_url, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.cached_content_tokens = 6
    fake.thoughts_tokens = 25

    completion = sdk(gateway_url, key).chat.completions.create(
        model=GEMINI.model, messages=MESSAGES, max_tokens=50
    )

    [reply] = fake.replies
    prompt_tokens = count_prompt_tokens(fake.calls[0].json)
    visible_tokens = reply["usageMetadata"]["candidatesTokenCount"]
    assert reply["usageMetadata"]["cachedContentTokenCount"] == 6
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == visible_tokens + 25
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 6
    assert completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens == 25
    record = UsageRecord.objects.get()
    assert (record.input_tokens, record.cached_input_tokens, record.output_tokens) == (
        prompt_tokens,
        6,
        visible_tokens + 25,
    )
    expected_cost = usage_cost_usd(
        price=GEMINI.price,
        input_tokens=prompt_tokens,
        output_tokens=visible_tokens + 25,
        cached_input_tokens=6,
    )
    assert record.cost_usd == expected_cost
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - expected_cost


# --- answers not of the GenerateContentResponse shape ---------------------------------------


def response(*parts: Any, **candidate: Any) -> dict[str, Any]:
    """A GenerateContentResponse whose candidate has `parts` and the `candidate` fields given,
    well formed otherwise."""
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": list(parts)},
                "finishReason": "STOP",
                **candidate,
            }
        ],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 2},
        "modelVersion": GEMINI.upstream_model,
        "responseId": "r-0123",
    }


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param([response({"text": "Hello"})], id="not_an_object"),
        pytest.param({**response(), "candidates": "Hello"}, id="candidates_a_string"),
        pytest.param({**response(), "candidates": ["Hello"]}, id="candidate_not_an_object"),
        pytest.param(response(content="Hello"), id="content_a_string"),
        pytest.param(response(content={"parts": "Hello"}), id="parts_not_a_list"),
        pytest.param(response("Hello"), id="part_not_an_object"),
        pytest.param(response({"text": 5}), id="text_a_number"),
        pytest.param(response({"functionCall": "get_weather"}), id="function_call_a_string"),
        pytest.param(response({"functionCall": {"args": {}}}), id="function_call_without_name"),
        pytest.param(
            response({"functionCall": {"name": "get_weather", "args": [1]}}), id="args_a_list"
        ),
        pytest.param(response({"text": "Hello"}, finishReason=["STOP"]), id="finish_reason_a_list"),
    ],
)
def test_an_answer_not_of_the_generate_content_shape_fails_over(
    gateway_url, two_deployments, fake, answer
):
    assert_an_unreadable_answer_fails_over(gateway_url, GEMINI, fake, answer)


@pytest.mark.parametrize(
    "event",
    [
        pytest.param({"candidates": "more"}, id="candidates_a_string"),
        pytest.param({"candidates": [["more"]]}, id="candidate_a_list"),
        pytest.param({"candidates": [{"content": {"parts": ["more"]}}]}, id="part_a_string"),
        pytest.param(
            {"candidates": [{"content": {"parts": [{"functionCall": {"args": {}}}]}}]},
            id="function_call_without_name",
        ),
        pytest.param(
            {"candidates": [{"content": {"parts": [{"text": " more"}]}, "finishReason": [1]}]},
            id="finish_reason_a_list",
        ),
    ],
)
def test_a_stream_event_not_of_the_generate_content_shape_ends_the_stream_and_settles(
    gateway_url, routed_to_fake, fake, event
):
    assert_an_unreadable_event_ends_the_stream(gateway_url, GEMINI, fake, event)
