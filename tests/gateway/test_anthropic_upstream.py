"""POST /v1/chat/completions to a model served by Anthropic, end to end: the official openai SDK
→ Switchboard served by uvicorn → the fake Anthropic Messages API over real HTTP, with the
charge checked to the last unit against the usage the upstream reported."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)

from billing.models import UsageRecord
from billing.money import Price, usage_cost_usd
from billing.selectors import wallet_balance_usd
from gateway.providers.base import estimate_prompt_tokens, estimate_tokens
from gateway.services import catalog_load
from tests.factories import make_key, make_org
from tests.fakes.anthropic import (
    REPLY_PREFIX,
    TOOL_REPLY_PREFIX,
    FakeAnthropic,
    count_input_tokens,
)
from tests.gateway.metering import assert_charged_exactly, sdk
from tests.gateway.upstreams import fake_upstream_fixtures, upstream_catalog

KEY_ENV = "SWITCHBOARD_TEST_ANTHROPIC_KEY"
SECRET = "fake-anthropic-secret"
MODEL = "claude-test"
UPSTREAM_MODEL = "claude-test-upstream"
PRICE = Price(
    input_per_mtok_usd=Decimal("3.00"),
    output_per_mtok_usd=Decimal("15.00"),
    cached_input_per_mtok_usd=Decimal("0.30"),
    cache_write_input_per_mtok_usd=Decimal("3.75"),
)
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the switchboard operator please"},
]
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


_anthropic_server, fake_anthropic = fake_upstream_fixtures(
    "fake_anthropic", lambda: FakeAnthropic(api_key=SECRET), key_env=KEY_ENV, secret=SECRET
)


@pytest.fixture
def anthropic_catalog(fake_anthropic: FakeAnthropic, transactional_db: None) -> None:
    """A catalog whose model `claude-test` routes to the fake Anthropic upstream."""
    catalog_load(data=catalog_for(fake_anthropic, UPSTREAM_MODEL))


def catalog_for(fake: FakeAnthropic, *upstream_models: str) -> dict[str, Any]:
    """`claude-test` routed to the fake Anthropic upstream, once per upstream model."""
    return upstream_catalog(
        provider="anthropic-fake",
        kind="anthropic",
        base_url=fake.base_url,
        key_env=KEY_ENV,
        model=MODEL,
        upstream_models=list(upstream_models),
        price={"input": "3.00", "output": "15.00", "cached_input": "0.30", "cache_write": "3.75"},
    )


def reported(reply: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt tokens in all, output tokens, cached tokens) as the fake reported them."""
    usage = reply["usage"]
    prompt = (
        usage["input_tokens"]
        + usage["cache_read_input_tokens"]
        + usage["cache_creation_input_tokens"]
    )
    return prompt, usage["output_tokens"], usage["cache_read_input_tokens"]


def test_the_fake_is_read_by_the_official_anthropic_sdk(fake_anthropic):
    """What the gateway is tested against parses as Anthropic's own types."""
    client = anthropic.Anthropic(
        base_url=fake_anthropic.base_url.removesuffix("/v1"), api_key=SECRET, max_retries=0
    )

    message = client.messages.create(
        model=UPSTREAM_MODEL,
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
            base_url=fake_anthropic.base_url.removesuffix("/v1"), api_key="wrong", max_retries=0
        ).messages.create(
            model=UPSTREAM_MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )


def test_it_answers_and_charges_the_exact_price(gateway_url, anthropic_catalog, fake_anthropic):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    raw = sdk(gateway_url, key).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=50
    )
    completion = raw.parse()

    [call] = fake_anthropic.calls
    prompt_tokens = count_input_tokens(call.json)
    reply = f"{REPLY_PREFIX} Say hello to the switchboard"
    output_tokens = len(reply.split())
    assert completion.choices[0].message.content == reply
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == MODEL
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        prompt_tokens,
        output_tokens,
    )
    assert_charged_exactly(
        raw,
        org,
        price=PRICE,
        input_tokens=prompt_tokens,
        output_tokens=output_tokens,
        provider="anthropic-fake",
        upstream_model=UPSTREAM_MODEL,
    )


def test_it_sends_a_messages_api_request_with_the_provider_key(
    gateway_url, anthropic_catalog, fake_anthropic
):
    _, key = make_key(make_org())

    sdk(gateway_url, key).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=50, temperature=0.5, stop=["operator"]
    )

    [call] = fake_anthropic.calls
    assert (call.method, call.path) == ("POST", "/v1/messages")
    assert call.headers["x-api-key"] == SECRET
    assert call.headers["anthropic-version"] == "2023-06-01"
    assert call.headers["content-type"] == "application/json"
    assert "authorization" not in call.headers
    assert key not in str(call.headers)  # the client's key never reaches the provider
    assert call.json == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 50,
        "system": "You are terse.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Say hello to the switchboard operator please"}
                ],
            }
        ],
        "temperature": 0.5,
        "stop_sequences": ["operator"],
    }


def test_without_max_tokens_the_models_cap_is_sent(gateway_url, anthropic_catalog, fake_anthropic):
    _, key = make_key(make_org())

    sdk(gateway_url, key).chat.completions.create(model=MODEL, messages=MESSAGES)

    assert fake_anthropic.calls[0].json["max_tokens"] == 4096  # the catalog's default cap


@pytest.mark.parametrize(
    ("fields", "finish_reason", "content"),
    [
        ({"max_tokens": 3}, "length", "Hello from the"),
        ({"max_tokens": 50, "stop": "provider"}, "stop", "Hello from the fake Anthropic "),
    ],
)
def test_a_cut_answer_has_the_matching_finish_reason(
    gateway_url, anthropic_catalog, fake_anthropic, fields, finish_reason, content
):
    _, key = make_key(make_org())

    completion = sdk(gateway_url, key).chat.completions.create(
        model=MODEL, messages=MESSAGES, **fields
    )

    assert completion.choices[0].finish_reason == finish_reason
    assert completion.choices[0].message.content == content


def test_a_tool_call_round_trip(gateway_url, anthropic_catalog, fake_anthropic):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    client = sdk(gateway_url, key)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]

    first = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=100
    )

    [choice] = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert fake_anthropic.calls[0].json["tools"] == [
        {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        }
    ]

    messages += [
        {
            "role": "assistant",
            "content": choice.message.content,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=100
    )

    assert second.choices[0].message.content == f"{TOOL_REPLY_PREFIX} 18 degrees and sunny"
    assert second.choices[0].finish_reason == "stop"
    sent = fake_anthropic.calls[1].json["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [
            {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "Paris"}}
        ],
    }
    assert sent[2] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": call.id, "content": "18 degrees and sunny"}
        ],
    }
    # Both requests are billed exactly what the upstream reported.
    records = list(UsageRecord.objects.order_by("created_at", "id"))
    assert [(r.input_tokens, r.output_tokens) for r in records] == [
        reported(reply)[:2] for reply in fake_anthropic.replies
    ]
    total = sum(
        (
            usage_cost_usd(price=PRICE, input_tokens=prompt, output_tokens=output)
            for prompt, output, _ in map(reported, fake_anthropic.replies)
        ),
        Decimal(0),
    )
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - total


def test_prompt_cache_reads_and_writes_are_billed_at_their_own_prices(
    gateway_url, anthropic_catalog, fake_anthropic
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_anthropic.cache_read_input_tokens = 6
    fake_anthropic.cache_creation_input_tokens = 4

    completion = sdk(gateway_url, key).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=50
    )

    [reply] = fake_anthropic.replies
    # The fake reports 13 prompt tokens: 6 read from the cache, 4 written to it, 3 uncached.
    assert reply["usage"]["input_tokens"] == 3
    assert reply["usage"]["cache_read_input_tokens"] == 6
    assert reply["usage"]["cache_creation_input_tokens"] == 4
    prompt_tokens = count_input_tokens(fake_anthropic.calls[0].json)
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
        price=PRICE,
        input_tokens=prompt_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=6,
        cache_write_input_tokens=4,
    )
    assert record.cost_usd == expected_cost
    # 3 × 3.00 + 6 × 0.30 + 4 × 3.75 per 1M for the prompt.
    assert expected_cost == (Decimal("25.80") + output_tokens * Decimal(15)) / 1_000_000
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - expected_cost


@pytest.mark.parametrize("upstream_status", [500, 529, 401, 403, 429])
def test_an_upstream_failure_gets_502_and_is_recorded_uncharged(
    gateway_url, anthropic_catalog, fake_anthropic, upstream_status
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_anthropic.fail_next(
        upstream_status,
        body={"type": "error", "error": {"type": "x", "message": "secret upstream detail"}},
    )

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=MODEL, messages=MESSAGES)

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_failed"
    assert "secret upstream detail" not in caught.value.response.text
    assert fake_anthropic.base_url not in caught.value.response.text
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.UPSTREAM_ERROR
    assert record.cost_usd == 0


def test_a_wrong_provider_key_gets_502_without_the_upstream_detail(
    gateway_url, anthropic_catalog, fake_anthropic, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "sk-ant-wrong")
    _, key = make_key(make_org())

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=MODEL, messages=MESSAGES)

    assert caught.value.status_code == 502
    assert fake_anthropic.calls[0].headers["x-api-key"] == "sk-ant-wrong"
    assert "x-api-key" not in caught.value.response.text
    assert "sk-ant-wrong" not in caught.value.response.text


def test_a_request_the_provider_refuses_gets_400_with_its_reason(
    gateway_url, anthropic_catalog, fake_anthropic
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_anthropic.fail_next(
        400,
        body={
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "prompt is too long"},
        },
    )

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=MODEL, messages=MESSAGES)

    assert "prompt is too long" in caught.value.message
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    assert not UsageRecord.objects.exists()


def test_a_request_that_cannot_be_translated_gets_400_and_never_leaves(
    gateway_url, anthropic_catalog, fake_anthropic
):
    _, key = make_key(make_org())
    audio: list[Any] = [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway_url, key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": audio}]
        )

    assert caught.value.param == "messages[0].content[0]"
    assert fake_anthropic.calls == []
    assert not UsageRecord.objects.exists()


# --- streaming: Anthropic's Messages events relayed as OpenAI chunks ------------------------


def streamed_calls(chunks: list[Any]) -> list[dict[str, str]]:
    """The tool calls of a streamed answer, put together from their deltas by index."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += (delta.function and delta.function.name) or ""
                call["arguments"] += (delta.function and delta.function.arguments) or ""
    return [calls[index] for index in sorted(calls)]


def test_it_streams_and_charges_the_reported_usage_cache_tokens_included(
    gateway_url, anthropic_catalog, fake_anthropic
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_anthropic.cache_read_input_tokens = 6
    fake_anthropic.cache_creation_input_tokens = 4

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    [call] = fake_anthropic.calls
    assert call.json["stream"] is True
    [reply] = fake_anthropic.replies
    prompt_tokens, output_tokens, cached = reported(reply)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply["content"][0]["text"]
    assert {c.model for c in chunks} == {MODEL}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, output_tokens)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == cached == 6
    record = UsageRecord.objects.get()
    assert (record.input_tokens, record.output_tokens) == (prompt_tokens, output_tokens)
    assert (record.cached_input_tokens, record.cache_write_input_tokens) == (6, 4)
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert record.status == UsageRecord.Status.OK
    expected = usage_cost_usd(
        price=PRICE,
        input_tokens=prompt_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=6,
        cache_write_input_tokens=4,
    )
    assert record.cost_usd == expected > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - expected


def test_a_streamed_tool_call_round_trip(gateway_url, anthropic_catalog, fake_anthropic):
    """OpenAI client ↔ Anthropic upstream, streamed: tool_use arrives as input_json_deltas."""
    _, key = make_key(make_org(credit_usd="10"))
    client = sdk(gateway_url, key)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=100, stream=True
        )
    )

    [call] = streamed_calls(chunks)
    assert call["id"].startswith("toolu_")
    assert call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call["id"], "content": "18 degrees and sunny"},
    ]
    second = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=100, stream=True
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
    assert text == f"{TOOL_REPLY_PREFIX} 18 degrees and sunny"
    records = UsageRecord.objects.order_by("created_at", "id")
    assert [(r.input_tokens, r.output_tokens) for r in records] == [
        reported(reply)[:2] for reply in fake_anthropic.replies
    ]
    assert {r.status for r in records} == {UsageRecord.Status.OK}


def test_a_stream_cut_midway_ends_with_an_error_event_and_settles_interrupted(
    gateway_url, anthropic_catalog, fake_anthropic
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_anthropic.cut_stream_after(3)
    received: list[str] = []

    with pytest.raises(openai.APIError) as caught:
        for chunk in sdk(gateway_url, key).chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=50, stream=True
        ):
            received.extend(c.delta.content or "" for c in chunk.choices)

    assert "broke off" in caught.value.message
    assert len([piece for piece in received if piece]) == 3
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.output_tokens >= 3
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


def test_an_error_event_midway_ends_the_stream_and_settles_interrupted(
    gateway_url, anthropic_catalog, fake_anthropic
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_anthropic.error_stream_after(2)

    with pytest.raises(openai.APIError) as caught:
        list(
            sdk(gateway_url, key).chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=50, stream=True
            )
        )

    # Our words, not the provider's.
    assert caught.value.message == "The provider failed in the middle of the stream."
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


def test_a_stream_without_usage_is_charged_an_estimate_labelled_as_such(
    gateway_url, anthropic_catalog, fake_anthropic
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_anthropic.omit_usage_next()

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == fake_anthropic.replies[0]["content"][0]["text"]
    assert all(c.usage is None for c in chunks)  # nothing reported, nothing passed on
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.OK
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.input_tokens == estimate_prompt_tokens(MESSAGES)
    assert record.output_tokens == max(estimate_tokens(text), len(text.split()))
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


# --- a stream's failover before its first byte ---------------------------------------------


@pytest.fixture
def two_deployments(fake_anthropic, transactional_db, settings):
    """`claude-test` on two deployments of the fake; the first waits at most half a second for
    its first byte, and a Retry-After of up to two seconds is waited for on the same route."""
    settings.GATEWAY_MAX_RETRY_AFTER_SECONDS = 2
    catalog = catalog_for(fake_anthropic, "claude-1", "claude-2")
    catalog["models"][0]["routes"][0]["timeouts"] = {"first_byte": 0.5}
    catalog_load(data=catalog)


def streamed_text(gateway_url: str, key: str) -> str:
    chunks = sdk(gateway_url, key).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=50, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_stream_past_its_first_byte_timeout_fails_over(
    gateway_url, two_deployments, fake_anthropic
):
    _, key = make_key(make_org(credit_usd="10"))
    fake_anthropic.delay_next(5)

    assert streamed_text(gateway_url, key)

    assert [call.json["model"] for call in fake_anthropic.calls] == ["claude-1", "claude-2"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("claude-2", 2, "ok")
    assert record.usage_source == UsageRecord.UsageSource.REPORTED


def test_a_stream_answered_429_with_a_short_retry_after_retries_the_same_route(
    gateway_url, two_deployments, fake_anthropic
):
    _, key = make_key(make_org(credit_usd="10"))
    fake_anthropic.fail_next(429, headers={"Retry-After": "1"})

    assert streamed_text(gateway_url, key)

    assert [call.json["model"] for call in fake_anthropic.calls] == ["claude-1", "claude-1"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("claude-1", 2, "ok")
