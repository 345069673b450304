"""POST /v1/chat/completions to a model served by Gemini, end to end: the official openai SDK →
Switchboard served by uvicorn → the fake Gemini generateContent API over real HTTP, with the
charge checked to the last unit against the usage the upstream reported."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

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
from tests.fakes.gemini import REPLY_PREFIX, TOOL_REPLY_PREFIX, FakeGemini, count_prompt_tokens
from tests.gateway.metering import assert_charged_exactly, sdk
from tests.gateway.upstreams import fake_upstream_fixtures, upstream_catalog

KEY_ENV = "SWITCHBOARD_TEST_GEMINI_KEY"
SECRET = "fake-gemini-secret"
MODEL = "gemini-test"
UPSTREAM_MODEL = "gemini-test-upstream"
PRICE = Price(
    input_per_mtok_usd=Decimal("1.25"),
    output_per_mtok_usd=Decimal("10.00"),
    cached_input_per_mtok_usd=Decimal("0.125"),
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
            "additionalProperties": False,
        },
    },
}


_gemini_server, fake_gemini = fake_upstream_fixtures(
    "fake_gemini", lambda: FakeGemini(api_key=SECRET), key_env=KEY_ENV, secret=SECRET
)


@pytest.fixture
def gemini_catalog(fake_gemini: FakeGemini, transactional_db: None) -> None:
    """A catalog whose model `gemini-test` routes to the fake Gemini upstream."""
    catalog_load(data=catalog_for(fake_gemini, UPSTREAM_MODEL))


def catalog_for(fake: FakeGemini, *upstream_models: str) -> dict[str, Any]:
    """`gemini-test` routed to the fake Gemini upstream, once per upstream model."""
    return upstream_catalog(
        provider="gemini-fake",
        kind="gemini",
        base_url=fake.base_url,
        key_env=KEY_ENV,
        model=MODEL,
        upstream_models=list(upstream_models),
        price={"input": "1.25", "output": "10.00", "cached_input": "0.125"},
    )


def reported(reply: dict[str, Any]) -> tuple[int, int]:
    """(prompt tokens, output tokens) as the fake reported them; thinking is output."""
    usage = reply["usageMetadata"]
    return usage["promptTokenCount"], usage["candidatesTokenCount"] + usage.get(
        "thoughtsTokenCount", 0
    )


def test_it_answers_and_charges_the_exact_price(gateway_url, gemini_catalog, fake_gemini):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    raw = sdk(gateway_url, key).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, max_tokens=50
    )
    completion = raw.parse()

    [call] = fake_gemini.calls
    prompt_tokens = count_prompt_tokens(call.json)
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
        provider="gemini-fake",
        upstream_model=UPSTREAM_MODEL,
    )


def test_it_sends_a_generate_content_request_with_the_key_in_a_header(
    gateway_url, gemini_catalog, fake_gemini
):
    _, key = make_key(make_org())

    sdk(gateway_url, key).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=50,
        temperature=0.5,
        top_p=0.9,
        stop=["operator"],
        response_format={"type": "json_object"},
    )

    [call] = fake_gemini.calls
    assert (call.method, call.path) == (
        "POST",
        f"/v1beta/models/{UPSTREAM_MODEL}:generateContent",
    )
    assert call.headers["x-goog-api-key"] == SECRET
    assert call.headers["content-type"] == "application/json"
    assert "authorization" not in call.headers
    assert key not in str(call.headers)  # the client's key never reaches the provider
    assert call.json == {
        "contents": [
            {"role": "user", "parts": [{"text": "Say hello to the switchboard operator please"}]}
        ],
        "systemInstruction": {"parts": [{"text": "You are terse."}]},
        "generationConfig": {
            "maxOutputTokens": 50,
            "temperature": 0.5,
            "topP": 0.9,
            "stopSequences": ["operator"],
            "responseMimeType": "application/json",
        },
    }


@pytest.mark.parametrize(
    ("fields", "finish_reason", "content"),
    [
        ({"max_tokens": 3}, "length", "Hello from the"),
        ({"max_tokens": 50, "stop": "provider"}, "stop", "Hello from the fake Gemini "),
    ],
)
def test_a_cut_answer_has_the_matching_finish_reason(
    gateway_url, gemini_catalog, fake_gemini, fields, finish_reason, content
):
    _, key = make_key(make_org())

    completion = sdk(gateway_url, key).chat.completions.create(
        model=MODEL, messages=MESSAGES, **fields
    )

    assert completion.choices[0].finish_reason == finish_reason
    assert completion.choices[0].message.content == content


def test_a_tool_call_round_trip_carries_the_thought_signature(
    gateway_url, gemini_catalog, fake_gemini
):
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
    assert call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert fake_gemini.calls[0].json["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "The current weather in a city.",
                    "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"],
                }
            ]
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
    # The fake refuses, as Gemini 3 does, a function call sent back without its signature.
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=100
    )

    assert second.choices[0].message.content == f"{TOOL_REPLY_PREFIX} 18 degrees and sunny"
    assert second.choices[0].finish_reason == "stop"
    issued = fake_gemini.replies[0]["candidates"][0]["content"]["parts"][0]["thoughtSignature"]
    assert fake_gemini.calls[1].json["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": issued,
                }
            ],
        },
        {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "name": "get_weather",
                        "response": {"output": "18 degrees and sunny"},
                    }
                }
            ],
        },
    ]
    records = list(UsageRecord.objects.order_by("created_at", "id"))
    assert [(r.input_tokens, r.output_tokens) for r in records] == [
        reported(reply) for reply in fake_gemini.replies
    ]
    total = sum(
        (
            usage_cost_usd(price=PRICE, input_tokens=prompt, output_tokens=output)
            for prompt, output in map(reported, fake_gemini.replies)
        ),
        Decimal(0),
    )
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - total


def test_a_function_call_sent_back_without_its_signature_is_refused_with_the_reason(
    gateway_url, gemini_catalog, fake_gemini
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
            model=MODEL, messages=messages, tools=[WEATHER_TOOL]
        )

    assert "thought_signature" in caught.value.message


def test_thinking_is_billed_as_output_and_cached_tokens_at_the_cached_price(
    gateway_url, gemini_catalog, fake_gemini
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_gemini.cached_content_tokens = 6
    fake_gemini.thoughts_tokens = 25

    completion = sdk(gateway_url, key).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=50
    )

    [reply] = fake_gemini.replies
    prompt_tokens = count_prompt_tokens(fake_gemini.calls[0].json)
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
        price=PRICE,
        input_tokens=prompt_tokens,
        output_tokens=visible_tokens + 25,
        cached_input_tokens=6,
    )
    assert record.cost_usd == expected_cost
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - expected_cost


@pytest.mark.parametrize("upstream_status", [500, 503, 401, 403, 429])
def test_an_upstream_failure_gets_502_and_is_recorded_uncharged(
    gateway_url, gemini_catalog, fake_gemini, upstream_status
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_gemini.fail_next(
        upstream_status,
        body={"error": {"code": upstream_status, "message": "secret upstream detail"}},
    )

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=MODEL, messages=MESSAGES)

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_failed"
    assert "secret upstream detail" not in caught.value.response.text
    assert fake_gemini.base_url not in caught.value.response.text
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.UPSTREAM_ERROR
    assert record.cost_usd == 0


def test_a_wrong_provider_key_gets_502_although_google_answers_400(
    gateway_url, gemini_catalog, fake_gemini, monkeypatch
):
    monkeypatch.setenv(KEY_ENV, "AIza-wrong")
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=MODEL, messages=MESSAGES)

    # Google says 400 INVALID_ARGUMENT (API_KEY_INVALID): still our failure, not the caller's.
    assert fake_gemini.calls[0].headers["x-goog-api-key"] == "AIza-wrong"
    assert caught.value.status_code == 502
    assert "API key" not in caught.value.response.text
    assert "AIza-wrong" not in caught.value.response.text
    assert UsageRecord.objects.get().status == UsageRecord.Status.UPSTREAM_ERROR


def test_a_request_the_provider_refuses_gets_400_with_its_reason(
    gateway_url, gemini_catalog, fake_gemini
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_gemini.fail_next(
        400,
        body={
            "error": {
                "code": 400,
                "message": "The input token count exceeds the maximum.",
                "status": "INVALID_ARGUMENT",
            }
        },
    )

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway_url, key).chat.completions.create(model=MODEL, messages=MESSAGES)

    assert "input token count exceeds" in caught.value.message
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    assert not UsageRecord.objects.exists()


# --- streaming: streamGenerateContent?alt=sse relayed as OpenAI chunks ----------------------


def test_it_streams_and_charges_the_reported_usage(gateway_url, gemini_catalog, fake_gemini):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    [call] = fake_gemini.calls
    assert call.path == f"/v1beta/models/{UPSTREAM_MODEL}:streamGenerateContent"
    assert call.headers["x-goog-api-key"] == SECRET
    [reply] = fake_gemini.replies
    prompt_tokens, output_tokens = reported(reply)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == f"{REPLY_PREFIX} Say hello to the switchboard"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert {c.model for c in chunks} == {MODEL}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, output_tokens)
    record = UsageRecord.objects.get()
    assert (record.input_tokens, record.output_tokens) == (prompt_tokens, output_tokens)
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert record.status == UsageRecord.Status.OK
    expected = usage_cost_usd(price=PRICE, input_tokens=prompt_tokens, output_tokens=output_tokens)
    assert record.cost_usd == expected > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - expected


def test_a_streamed_tool_call_round_trip_carries_the_thought_signature(
    gateway_url, gemini_catalog, fake_gemini
):
    """OpenAI client ↔ Gemini upstream, streamed: the functionCall arrives whole, signed."""
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

    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    [delta] = deltas
    assert delta.index == 0 and delta.id is not None and delta.function is not None
    assert delta.function.name == "get_weather"
    assert json.loads(delta.function.arguments or "") == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": delta.id,
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": delta.function.arguments or "",
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": delta.id, "content": "18 degrees and sunny"},
    ]
    second = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER_TOOL], max_tokens=100, stream=True
        )
    )

    # The fake refuses (400) a function call sent back without the signature it issued.
    text = "".join(c.choices[0].delta.content or "" for c in second if c.choices)
    assert text.startswith(TOOL_REPLY_PREFIX)
    sent = fake_gemini.calls[1].json["contents"]
    assert sent[1]["parts"][0]["thoughtSignature"]
    records = UsageRecord.objects.order_by("created_at", "id")
    assert [(r.input_tokens, r.output_tokens) for r in records] == [
        reported(reply) for reply in fake_gemini.replies
    ]


def test_a_stream_cut_midway_ends_with_an_error_event_and_settles_interrupted(
    gateway_url, gemini_catalog, fake_gemini
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_gemini.cut_stream_after(3)
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
    # Gemini repeats the usage so far in every event, but a cut stream's is not final.
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.output_tokens >= 3
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


def test_a_stream_without_usage_is_charged_an_estimate_labelled_as_such(
    gateway_url, gemini_catalog, fake_gemini
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_gemini.omit_usage_next()

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
    assert text == f"{REPLY_PREFIX} Say hello to the switchboard"
    assert all(c.usage is None for c in chunks)
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.OK
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.input_tokens == estimate_prompt_tokens(MESSAGES)
    assert record.output_tokens == max(estimate_tokens(text), len(text.split()))
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


# --- a stream's failover before its first byte ---------------------------------------------


@pytest.fixture
def two_deployments(fake_gemini, transactional_db, settings):
    """`gemini-test` on two deployments of the fake; the first waits at most half a second for
    its first byte, and a Retry-After of up to two seconds is waited for on the same route."""
    settings.GATEWAY_MAX_RETRY_AFTER_SECONDS = 2
    catalog = catalog_for(fake_gemini, "gemini-1", "gemini-2")
    catalog["models"][0]["routes"][0]["timeouts"] = {"first_byte": 0.5}
    catalog_load(data=catalog)


def streamed_text(gateway_url: str, key: str) -> str:
    chunks = sdk(gateway_url, key).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=50, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def called_models(fake: FakeGemini) -> list[str]:
    """The upstream model of each call, from its path (`…/models/<model>:<method>`)."""
    return [call.path.rsplit("/", 1)[-1].split(":")[0] for call in fake.calls]


def test_a_stream_past_its_first_byte_timeout_fails_over(gateway_url, two_deployments, fake_gemini):
    _, key = make_key(make_org(credit_usd="10"))
    fake_gemini.delay_next(5)

    assert streamed_text(gateway_url, key)

    assert called_models(fake_gemini) == ["gemini-1", "gemini-2"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("gemini-2", 2, "ok")
    assert record.usage_source == UsageRecord.UsageSource.REPORTED


def test_a_stream_answered_429_with_a_short_retry_after_retries_the_same_route(
    gateway_url, two_deployments, fake_gemini
):
    _, key = make_key(make_org(credit_usd="10"))
    fake_gemini.fail_next(429, headers={"Retry-After": "1"})

    assert streamed_text(gateway_url, key)

    assert called_models(fake_gemini) == ["gemini-1", "gemini-1"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("gemini-1", 2, "ok")
