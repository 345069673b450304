"""POST /v1/chat/completions to a model served by a provider whose API the gateway translates to,
end to end, once per provider (Anthropic's Messages API, Gemini's generateContent): the official
openai SDK → Switchboard served by uvicorn → the provider's fake over real HTTP, with the charge
checked to the last unit against the usage the upstream reported.

What differs between the providers is described in tests/gateway/upstreams.py; what only one of
them has is tested in test_anthropic_upstream.py and test_gemini_upstream.py."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionMessageParam

from billing.models import Reservation, UsageRecord
from billing.money import usage_cost_usd
from billing.selectors import wallet_balance_usd
from gateway.providers.base import estimate_prompt_tokens, estimate_tokens
from tests.factories import make_key, make_org
from tests.gateway.metering import assert_charged_exactly, sdk
from tests.gateway.upstreams import (
    ANTHROPIC,
    GEMINI,
    MESSAGES,
    WEATHER_TOOL,
    translated_upstream_fixtures,
)

upstream, _fake_server, fake, routed_to_fake, two_deployments = translated_upstream_fixtures(
    ANTHROPIC, GEMINI
)


def messages_sdk(gateway_url: str, key: str) -> anthropic.Anthropic:
    """The official Anthropic client pointed at the gateway's /v1/messages, without retries."""
    return anthropic.Anthropic(base_url=gateway_url.removesuffix("/v1"), api_key=key, max_retries=0)


def test_it_answers_and_charges_the_exact_price(gateway_url, upstream, routed_to_fake, fake):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    raw = sdk(gateway_url, key).chat.completions.with_raw_response.create(
        model=upstream.model, messages=MESSAGES, max_tokens=50
    )
    completion = raw.parse()

    [call] = fake.calls
    prompt_tokens = upstream.count_prompt_tokens(call.json)
    reply = f"{upstream.reply_prefix} Say hello to the switchboard"
    output_tokens = len(reply.split())
    assert completion.choices[0].message.content == reply
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == upstream.model
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        prompt_tokens,
        output_tokens,
    )
    assert_charged_exactly(
        raw,
        org,
        price=upstream.price,
        input_tokens=prompt_tokens,
        output_tokens=output_tokens,
        provider=upstream.provider,
        upstream_model=upstream.upstream_model,
    )


def test_it_sends_the_providers_request_with_the_provider_key(
    gateway_url, upstream, routed_to_fake, fake
):
    _, key = make_key(make_org())

    sdk(gateway_url, key).chat.completions.create(
        model=upstream.model, messages=MESSAGES, max_tokens=50, **upstream.sampling_fields
    )

    [call] = fake.calls
    path, body = upstream.sent_request()
    assert (call.method, call.path) == ("POST", path)
    assert call.headers[upstream.key_header] == upstream.secret
    assert {name: call.headers.get(name) for name in upstream.request_headers} == (
        upstream.request_headers
    )
    assert "authorization" not in call.headers
    assert key not in str(call.headers)  # the client's key never reaches the provider
    assert call.json == body


@pytest.mark.parametrize(
    ("fields", "finish_reason", "content"),
    [
        pytest.param({"max_tokens": 3}, "length", "Hello from the", id="max_tokens"),
        pytest.param(
            {"max_tokens": 50, "stop": "provider"},
            "stop",
            "Hello from the fake {Name} ",
            id="stop_sequence",
        ),
    ],
)
def test_a_cut_answer_has_the_matching_finish_reason(
    gateway_url, upstream, routed_to_fake, fake, fields, finish_reason, content
):
    _, key = make_key(make_org())

    completion = sdk(gateway_url, key).chat.completions.create(
        model=upstream.model, messages=MESSAGES, **fields
    )

    assert completion.choices[0].finish_reason == finish_reason
    assert completion.choices[0].message.content == content.format(Name=upstream.name.title())


def test_a_tool_call_round_trip(gateway_url, upstream, routed_to_fake, fake):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    client = sdk(gateway_url, key)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]

    first = client.chat.completions.create(
        model=upstream.model, messages=messages, tools=[WEATHER_TOOL], max_tokens=100
    )

    [choice] = first.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert call.id.startswith(upstream.tool_call_id_prefix)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert fake.calls[0].json["tools"] == upstream.weather_tool()

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
        model=upstream.model, messages=messages, tools=[WEATHER_TOOL], max_tokens=100
    )

    assert second.choices[0].message.content == f"{upstream.tool_reply_prefix} 18 degrees and sunny"
    assert second.choices[0].finish_reason == "stop"
    sent = upstream.turns(fake.calls[1].json)
    assert sent[1:] == upstream.tool_turns(call.id, fake.replies[0])
    # Both requests are billed exactly what the upstream reported.
    reported = [upstream.reported(reply) for reply in fake.replies]
    records = list(UsageRecord.objects.order_by("created_at", "id"))
    assert [(r.input_tokens, r.output_tokens) for r in records] == [
        (usage.prompt_tokens, usage.output_tokens) for usage in reported
    ]
    total = sum(
        (
            usage_cost_usd(
                price=upstream.price,
                input_tokens=usage.prompt_tokens,
                output_tokens=usage.output_tokens,
            )
            for usage in reported
        ),
        Decimal(0),
    )
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - total


# --- errors ---------------------------------------------------------------------------------


# The provider's own status for "overloaded": Anthropic's 529, Google's 503.
OVERLOADED = "overloaded"


@pytest.mark.parametrize("upstream_status", [500, OVERLOADED, 401, 403, 429])
def test_an_upstream_failure_gets_502_and_is_recorded_uncharged(
    gateway_url, upstream, routed_to_fake, fake, upstream_status
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    status = upstream.overloaded_status if upstream_status == OVERLOADED else upstream_status
    fake.fail_next(status, body=upstream.error_body(status, "secret upstream detail"))

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=upstream.model, messages=MESSAGES)

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_failed"
    assert "secret upstream detail" not in caught.value.response.text
    assert fake.base_url not in caught.value.response.text
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.UPSTREAM_ERROR
    assert record.cost_usd == 0


# Neither a Message nor a GenerateContentResponse (each adapter's own are in its test module).
UNREADABLE_ANSWER = {"content": "Hello", "candidates": "Hello"}


def test_an_unreadable_answer_gets_502_and_is_recorded_uncharged(
    gateway_url, upstream, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.answer_next(UNREADABLE_ANSWER)

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=upstream.model, messages=MESSAGES)

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_failed"
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    record = UsageRecord.objects.get()
    assert (record.status, record.cost_usd) == (UsageRecord.Status.UPSTREAM_ERROR, 0)
    assert Reservation.objects.get().state == Reservation.State.VOIDED


def test_an_unreadable_answer_on_v1_messages_gets_anthropics_502(
    gateway_url, upstream, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.answer_next(UNREADABLE_ANSWER)

    with pytest.raises(anthropic.APIStatusError) as caught:
        messages_sdk(gateway_url, key).messages.create(
            model=upstream.model, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )

    assert caught.value.status_code == 502
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The provider's answer could not be read."},
    }
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    assert UsageRecord.objects.get().status == UsageRecord.Status.UPSTREAM_ERROR


def test_a_wrong_provider_key_gets_502_without_the_upstream_detail(
    gateway_url, upstream, routed_to_fake, fake, monkeypatch
):
    monkeypatch.setenv(upstream.key_env, upstream.wrong_key)
    _, key = make_key(make_org())

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=upstream.model, messages=MESSAGES)

    # Our failure, not the caller's, whatever the provider answers (Google says 400).
    assert caught.value.status_code == 502
    assert fake.calls[0].headers[upstream.key_header] == upstream.wrong_key
    assert upstream.wrong_key_detail not in caught.value.response.text
    assert upstream.wrong_key not in caught.value.response.text
    assert UsageRecord.objects.get().status == UsageRecord.Status.UPSTREAM_ERROR


def test_a_request_the_provider_refuses_gets_400_with_its_reason(
    gateway_url, upstream, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.fail_next(400, body=upstream.error_body(400, "The prompt is too long."))

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=upstream.model, messages=MESSAGES)

    assert "The prompt is too long." in caught.value.message
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    assert not UsageRecord.objects.exists()


# --- streaming: the provider's events relayed as OpenAI chunks ---------------------------------


def answer_streamed(
    gateway_url: str, key: str, model: str, *, include_usage: bool = False
) -> list[Any]:
    """The chunks of `model`'s streamed answer to MESSAGES, in at most 50 tokens; with
    `include_usage`, the client asks for the usage chunk."""
    chunks = sdk(gateway_url, key).chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True} if include_usage else openai.omit,
    )
    return list(chunks)


def streamed_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def tool_call_deltas(chunks: list[Any]) -> list[Any]:
    return [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]


def streamed_calls(chunks: list[Any]) -> list[dict[str, str]]:
    """The tool calls of a streamed answer, put together from their deltas by index."""
    calls: dict[int, dict[str, str]] = {}
    for delta in tool_call_deltas(chunks):
        call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
        call["id"] += delta.id or ""
        call["name"] += (delta.function and delta.function.name) or ""
        call["arguments"] += (delta.function and delta.function.arguments) or ""
    return [calls[index] for index in sorted(calls)]


def test_it_streams_and_charges_the_reported_usage_cache_tokens_included(
    gateway_url, upstream, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    upstream.cache_prompts(fake)

    chunks = answer_streamed(gateway_url, key, upstream.model, include_usage=True)

    [call] = fake.calls
    path, stream_fields = upstream.stream_request()
    assert call.path == path
    assert {name: call.json.get(name) for name in stream_fields} == stream_fields
    assert call.headers[upstream.key_header] == upstream.secret
    [reply] = fake.replies
    reported = upstream.reported(reply)
    text = streamed_text(chunks)
    assert (
        text
        == upstream.reply_text(reply)
        == f"{upstream.reply_prefix} Say hello to the switchboard"
    )
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert {c.model for c in chunks} == {upstream.model}
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "stop" and set(finish[:-1]) == {None}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        reported.prompt_tokens,
        reported.output_tokens,
    )
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == reported.cached_tokens == 6
    record = UsageRecord.objects.get()
    assert (record.input_tokens, record.output_tokens) == (
        reported.prompt_tokens,
        reported.output_tokens,
    )
    assert (record.cached_input_tokens, record.cache_write_input_tokens) == (
        reported.cached_tokens,
        reported.cache_write_tokens,
    )
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert record.status == UsageRecord.Status.OK
    expected = usage_cost_usd(
        price=upstream.price,
        input_tokens=reported.prompt_tokens,
        output_tokens=reported.output_tokens,
        cached_input_tokens=reported.cached_tokens,
        cache_write_input_tokens=reported.cache_write_tokens,
    )
    assert record.cost_usd == expected > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - expected


def stream_offering_the_weather_tool(
    client: openai.OpenAI, model: str, messages: list[ChatCompletionMessageParam]
) -> list[Any]:
    """The chunks of `model`'s streamed answer to `messages`, offered WEATHER_TOOL."""
    chunks = client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER_TOOL], max_tokens=100, stream=True
    )
    return list(chunks)


def test_a_streamed_tool_call_round_trip(gateway_url, upstream, routed_to_fake, fake):
    """OpenAI client ↔ the provider, streamed: Anthropic's tool_use arrives as
    input_json_deltas, Gemini's functionCall whole and signed."""
    _, key = make_key(make_org(credit_usd="10"))
    client = sdk(gateway_url, key)
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]

    chunks = stream_offering_the_weather_tool(client, upstream.model, messages)

    deltas = tool_call_deltas(chunks)
    assert len(deltas) == upstream.tool_call_deltas
    assert {delta.index for delta in deltas} == {0}
    [call] = streamed_calls(chunks)
    assert call["id"].startswith(upstream.tool_call_id_prefix)
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
    second = stream_offering_the_weather_tool(client, upstream.model, messages)

    assert streamed_text(second) == f"{upstream.tool_reply_prefix} 18 degrees and sunny"
    sent = upstream.turns(fake.calls[1].json)
    assert sent[1:] == upstream.tool_turns(call["id"], fake.replies[0])
    records = UsageRecord.objects.order_by("created_at", "id")
    assert [(r.input_tokens, r.output_tokens) for r in records] == [
        (usage.prompt_tokens, usage.output_tokens) for usage in map(upstream.reported, fake.replies)
    ]
    assert {r.status for r in records} == {UsageRecord.Status.OK}


def test_a_stream_cut_midway_ends_with_an_error_event_and_settles_interrupted(
    gateway_url, upstream, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.cut_stream_after(3)
    received: list[str] = []

    with pytest.raises(openai.APIError) as caught:
        for chunk in sdk(gateway_url, key).chat.completions.create(
            model=upstream.model, messages=MESSAGES, max_tokens=50, stream=True
        ):
            received.extend(c.delta.content or "" for c in chunk.choices)

    assert "broke off" in caught.value.message
    assert len([piece for piece in received if piece]) == 3
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    # Estimated: Gemini repeats the usage so far in every event, but a cut stream's is not final.
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.output_tokens >= 3
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


def test_an_unreadable_event_on_v1_messages_ends_with_anthropics_error_event(
    gateway_url, upstream, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.send_event_next(["not", "an", "event"])
    received: list[str] = []

    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        messages_sdk(gateway_url, key).messages.stream(
            model=upstream.model, max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        ) as stream,
    ):
        received.extend(stream.text_stream)

    assert received
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd
    assert Reservation.objects.get().state == Reservation.State.SETTLED


def test_a_stream_without_usage_is_charged_an_estimate_labelled_as_such(
    gateway_url, upstream, routed_to_fake, fake
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.omit_usage_next()

    chunks = answer_streamed(gateway_url, key, upstream.model, include_usage=True)

    text = streamed_text(chunks)
    assert text == upstream.reply_text(fake.replies[0])
    assert text == f"{upstream.reply_prefix} Say hello to the switchboard"
    assert all(c.usage is None for c in chunks)  # nothing reported, nothing passed on
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.OK
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.input_tokens == estimate_prompt_tokens(MESSAGES)
    assert record.output_tokens == max(estimate_tokens(text), len(text.split()))
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


# --- a stream's failover before its first byte ---------------------------------------------


def test_a_stream_past_its_first_byte_timeout_fails_over(
    gateway_url, upstream, two_deployments, fake
):
    _, key = make_key(make_org(credit_usd="10"))
    fake.delay_next(5)

    assert streamed_text(answer_streamed(gateway_url, key, upstream.model))

    assert [upstream.called_model(call) for call in fake.calls] == ["deployment-1", "deployment-2"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("deployment-2", 2, "ok")
    assert record.usage_source == UsageRecord.UsageSource.REPORTED


def test_a_stream_answered_429_with_a_short_retry_after_retries_the_same_route(
    gateway_url, upstream, two_deployments, fake
):
    _, key = make_key(make_org(credit_usd="10"))
    fake.fail_next(429, headers={"Retry-After": "1"})

    assert streamed_text(answer_streamed(gateway_url, key, upstream.model))

    assert [upstream.called_model(call) for call in fake.calls] == ["deployment-1", "deployment-1"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("deployment-1", 2, "ok")
