"""POST /v1/messages, end to end: the official anthropic SDK → Switchboard served by uvicorn →
each kind of upstream (the fake OpenAI-style provider, the fake Anthropic Messages API, the
fake Gemini API) over real HTTP, streamed and not, with the charge checked to the last unit."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import pytest

from billing.models import Reservation, UsageRecord
from billing.money import Price, usage_cost_usd
from billing.selectors import wallet_balance_usd
from gateway.messages import request_to_openai
from gateway.providers.base import estimate_prompt_tokens
from gateway.services import catalog_load
from portal.models import Organization
from tests.factories import make_key, make_org
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai_tools import FakeToolCallingProvider
from tests.fakes.provider import (
    MISTRAL_REASONING_PARTS,
    FakeProvider,
    chat_answer,
    count_prompt_tokens,
    reply_for,
    tool_call,
)
from tests.gateway.metering import assert_charged_exactly

OPENAI_KEY_ENV = "SWITCHBOARD_TEST_MESSAGES_OPENAI_KEY"
ANTHROPIC_KEY_ENV = "SWITCHBOARD_TEST_MESSAGES_ANTHROPIC_KEY"
GEMINI_KEY_ENV = "SWITCHBOARD_TEST_MESSAGES_GEMINI_KEY"
SECRET = "fake-upstream-secret-for-messages"
PRICE = Price(input_per_mtok_usd=Decimal("3.00"), output_per_mtok_usd=Decimal("15.00"))
# Catalog model → (provider name, upstream model).
MODELS = {
    "gpt-test": ("openai-fake", "gpt-test-upstream"),
    "claude-test": ("anthropic-fake", "claude-test-upstream"),
    "gemini-test": ("gemini-fake", "gemini-test-upstream"),
}
SYSTEM = "You are terse."
QUESTION = "Say hello to the switchboard operator please"
WEATHER_TOOL: anthropic.types.ToolParam = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


@dataclass
class Upstreams:
    openai: FakeToolCallingProvider
    anthropic: FakeAnthropic
    gemini: FakeGemini

    def answered(self, model: str) -> tuple[str, int, int]:
        """(text, prompt tokens, output tokens) of the last answer the model's upstream gave,
        as that upstream reported them."""
        if model == "gpt-test":
            request = self.openai.calls[-1].json
            text = reply_for(request["messages"], request.get("max_tokens"))
            return text, count_prompt_tokens(request["messages"]), len(text.split())
        if model == "claude-test":
            reply = self.anthropic.replies[-1]
            usage = reply["usage"]
            prompt = (
                usage["input_tokens"]
                + usage["cache_read_input_tokens"]
                + usage["cache_creation_input_tokens"]
            )
            texts = [block.get("text", "") for block in reply["content"]]
            return "".join(texts), prompt, usage["output_tokens"]
        reply = self.gemini.replies[-1]
        metadata = reply["usageMetadata"]
        parts = reply["candidates"][0]["content"]["parts"]
        text = "".join(part.get("text", "") for part in parts)
        return text, metadata["promptTokenCount"], metadata["candidatesTokenCount"]


@pytest.fixture(scope="module")
def _servers() -> Iterator[Upstreams]:
    with (
        FakeToolCallingProvider() as openai_fake,
        FakeAnthropic(api_key=SECRET) as anthropic_fake,
        FakeGemini(api_key=SECRET) as gemini_fake,
    ):
        yield Upstreams(openai_fake, anthropic_fake, gemini_fake)


@pytest.fixture
def upstreams(
    _servers: Upstreams, monkeypatch: pytest.MonkeyPatch, transactional_db: None
) -> Upstreams:
    """The three fake upstreams, reset, and a catalog with one model on each."""
    for fake in (_servers.openai, _servers.anthropic, _servers.gemini):
        fake.reset()
    for env in (OPENAI_KEY_ENV, ANTHROPIC_KEY_ENV, GEMINI_KEY_ENV):
        monkeypatch.setenv(env, SECRET)
    providers = [
        ("openai-fake", "openai", _servers.openai.base_url, OPENAI_KEY_ENV),
        ("anthropic-fake", "anthropic", _servers.anthropic.base_url, ANTHROPIC_KEY_ENV),
        ("gemini-fake", "gemini", _servers.gemini.base_url, GEMINI_KEY_ENV),
    ]
    catalog_load(
        data={
            "providers": [
                {"name": name, "kind": kind, "base_url": url, "api_key_env": env}
                for name, kind, url, env in providers
            ],
            "models": [
                {
                    "name": model,
                    "routes": [{"provider": provider, "upstream_model": upstream_model}],
                    "price": {"input": "3.00", "output": "15.00"},
                }
                for model, (provider, upstream_model) in MODELS.items()
            ],
        }
    )
    return _servers


def client(gateway_url: str, key: str) -> anthropic.Anthropic:
    """The official anthropic SDK pointed at the gateway (it adds /v1 itself), no retries."""
    return anthropic.Anthropic(base_url=gateway_url.removesuffix("/v1"), api_key=key, max_retries=0)


def post_message(gateway_url: str, key: str, **fields: Any) -> httpx.Response:
    """A raw POST /v1/messages with its key as x-api-key: one short turn to gpt-test, with
    `fields` added."""
    return httpx.post(
        f"{gateway_url}/messages",
        headers={"x-api-key": key},
        json={
            "model": "gpt-test",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}],
            **fields,
        },
    )


def assert_stream_settled(
    organization: Organization, *, input_tokens: int, output_tokens: int, model: str
) -> UsageRecord:
    """The one usage record of a streamed request: reported, complete, charged exactly."""
    expected = usage_cost_usd(price=PRICE, input_tokens=input_tokens, output_tokens=output_tokens)
    record = UsageRecord.objects.get()
    assert (record.input_tokens, record.output_tokens) == (input_tokens, output_tokens)
    assert record.status == UsageRecord.Status.OK
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert (record.provider, record.upstream_model) == MODELS[model]
    assert record.cost_usd == expected > 0
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal(10) - expected
    assert Reservation.objects.get().state == Reservation.State.SETTLED
    return record


@pytest.mark.parametrize("model", list(MODELS))
def test_it_answers_a_message_and_charges_exactly(gateway_url, upstreams, model):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    make_key(make_org(credit_usd="10"))  # another organisation, never charged

    raw = client(gateway_url, key).messages.with_raw_response.create(
        model=model,
        max_tokens=50,
        system=SYSTEM,
        messages=[{"role": "user", "content": QUESTION}],
    )
    message = raw.parse()

    text, input_tokens, output_tokens = upstreams.answered(model)
    # The SDK's `_request_id` is read from Anthropic's own header, as on an error.
    assert message._request_id == raw.headers["x-request-id"]
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == model
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == text  # type: ignore[union-attr]
    assert QUESTION.split()[0] in text
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (
        input_tokens,
        output_tokens,
    )
    provider, upstream_model = MODELS[model]
    assert_charged_exactly(
        raw,
        org,
        price=PRICE,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        provider=provider,
        upstream_model=upstream_model,
    )


@pytest.mark.parametrize("model", list(MODELS))
def test_it_streams_a_message_and_charges_exactly(gateway_url, upstreams, model):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    with client(gateway_url, key).messages.stream(
        model=model,
        max_tokens=50,
        system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": QUESTION}],
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()

    text, input_tokens, output_tokens = upstreams.answered(model)
    assert streamed == text
    assert final.content[0].text == text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (input_tokens, output_tokens)
    assert_stream_settled(org, input_tokens=input_tokens, output_tokens=output_tokens, model=model)


def test_the_raw_stream_is_the_messages_event_sequence(gateway_url, upstreams):
    _, key = make_key(make_org(credit_usd="10"))

    with httpx.stream(
        "POST",
        f"{gateway_url}/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json={
            "model": "gpt-test",
            "max_tokens": 50,
            "stream": True,
            "messages": [{"role": "user", "content": QUESTION}],
        },
    ) as response:
        lines = [line for line in response.iter_lines() if line]

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    request_id = UsageRecord.objects.get().request_id
    assert response.headers["x-request-id"] == response.headers["request-id"] == request_id
    names = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [event["type"] for event in data] == names
    deltas = len(reply_for([{"role": "user", "content": QUESTION}], 50).split())
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * deltas,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert data[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    # The charge, as a comment the SDKs skip, between message_delta and message_stop.
    comment = lines.index("event: message_stop") - 1
    assert lines[comment] == f": cost_usd={UsageRecord.objects.get().cost_usd}"


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("model", list(MODELS))
def test_a_tool_call_round_trip_through_each_upstream(gateway_url, upstreams, model, streamed):
    """Anthropic client ↔ OpenAI-style, Anthropic and Gemini upstreams: the tool_use comes
    back, and its tool_result is accepted by the upstream that asked for it."""
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    sdk = client(gateway_url, key)
    question: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "What is the weather in Paris?"}
    ]

    def ask(messages: list[anthropic.types.MessageParam]) -> anthropic.types.Message:
        if not streamed:
            return sdk.messages.create(
                model=model, max_tokens=50, messages=messages, tools=[WEATHER_TOOL]
            )
        with sdk.messages.stream(
            model=model, max_tokens=50, messages=messages, tools=[WEATHER_TOOL]
        ) as stream:
            return stream.get_final_message()

    first = ask(question)

    assert first.stop_reason == "tool_use"
    [call] = [block for block in first.content if block.type == "tool_use"]
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})

    second = ask(
        [
            *question,
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call.id, "content": "18C and sunny"}
                ],
            },
        ]
    )

    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"
    records = UsageRecord.objects.order_by("created_at")
    assert [r.status for r in records] == [UsageRecord.Status.OK] * 2
    assert all(r.usage_source == UsageRecord.UsageSource.REPORTED for r in records)
    charged = sum((r.cost_usd for r in records), Decimal(0))
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - charged
    if model == "gpt-test":
        sent = upstreams.openai.calls[-1].json["messages"]
        assert sent[-2]["tool_calls"][0]["id"] == call.id
        assert sent[-1] == {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"}
        assert "18C" in second.content[0].text or "weather" in second.content[0].text
    elif model == "claude-test":
        sent = upstreams.anthropic.calls[-1].json["messages"]
        assert sent[-1]["content"][0]["tool_use_id"] == call.id
        assert "18C" in second.content[0].text
    else:
        sent = upstreams.gemini.calls[-1].json["contents"]
        assert sent[-1]["parts"][0]["functionResponse"]["name"] == "get_weather"


def test_a_stop_sequence_from_an_anthropic_upstream_is_reported_as_such(gateway_url, upstreams):
    _, key = make_key(make_org(credit_usd="10"))

    message = client(gateway_url, key).messages.create(
        model="claude-test",
        max_tokens=50,
        stop_sequences=["switchboard"],
        messages=[{"role": "user", "content": QUESTION}],
    )

    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "switchboard")
    assert upstreams.anthropic.calls[-1].json["stop_sequences"] == ["switchboard"]


def streamed_until_an_error(
    gateway_url: str, key: str, *, model: str
) -> tuple[list[str], anthropic.APIStatusError]:
    """Stream an answer to QUESTION through the anthropic SDK until the stream's error event:
    the text received before it, and the error the SDK raised for it."""
    received: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as caught,
        client(gateway_url, key).messages.stream(
            model=model, max_tokens=50, messages=[{"role": "user", "content": QUESTION}]
        ) as stream,
    ):
        received.extend(stream.text_stream)
    return received, caught.value


def test_an_anthropic_stream_cut_midway_ends_with_an_error_event_and_settles_interrupted(
    gateway_url, upstreams
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    upstreams.anthropic.cut_stream_after(3)
    received, error = streamed_until_an_error(gateway_url, key, model="claude-test")

    assert len(received) == 3
    assert error.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The provider's stream broke off."},
    }
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.output_tokens >= 3
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd
    assert Reservation.objects.get().state == Reservation.State.SETTLED


# Streamed tool calls of a shape a provider should not send: the translation (and the
# openai SDK) reads each.
UNREADABLE_TOOL_CALL_DELTAS = [
    pytest.param("call_1", id="tool_calls_a_string"),
    pytest.param(["?"], id="tool_call_a_string"),
    pytest.param([{"index": 0, "function": "get_weather"}], id="function_a_string"),
    pytest.param([{"index": 0, "function": {"name": 5}}], id="name_a_number"),
    pytest.param([{"index": 0, "function": {"arguments": {}}}], id="arguments_an_object"),
    pytest.param([{"index": "first", "function": {"arguments": "{}"}}], id="index_a_word"),
]


@pytest.mark.parametrize("tool_calls", UNREADABLE_TOOL_CALL_DELTAS)
def test_a_stream_chunk_the_adapter_cannot_read_ends_with_an_error_event_and_settles(
    gateway_url, upstreams, tool_calls
):
    # The stream's status went with its first event: an unreadable chunk after that ends it
    # as a break of the provider's, with Anthropic's error event, not as the gateway's own
    # failure nor with a connection dropped mid-body.
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    make_key(make_org(credit_usd="10"))  # another organisation, never charged
    upstreams.openai.send_chunk_next(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"tool_calls": tool_calls}}],
        }
    )
    received, error = streamed_until_an_error(gateway_url, key, model="gpt-test")

    assert len(received) == 1
    assert error.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "The provider's answer could not be read."},
    }
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.organization_id == org.pk
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd
    assert Reservation.objects.get().state == Reservation.State.SETTLED


@pytest.mark.parametrize(
    "tool_calls",
    [
        pytest.param({"id": "call_1"}, id="tool_calls_an_object"),
        pytest.param(["call_1"], id="tool_call_a_string"),
        pytest.param([tool_call("get_weather")], id="function_a_string"),
        pytest.param([tool_call({"name": ["get_weather"], "arguments": "{}"})], id="name_a_list"),
        pytest.param([tool_call({"name": "get_weather", "arguments": {}})], id="arguments_object"),
    ],
)
def test_an_answer_whose_tool_call_cannot_be_read_gets_502_and_is_not_charged(
    gateway_url, upstreams, tool_calls
):
    # The translation would have dropped the tool call from a message already charged.
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    other = make_org(credit_usd="10")
    make_key(other)
    answer = chat_answer({"content": None, "tool_calls": tool_calls}, finish_reason="tool_calls")
    upstreams.openai.answer_next(answer)

    with pytest.raises(anthropic.APIStatusError) as caught:
        client(gateway_url, key).messages.create(
            model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": QUESTION}]
        )

    assert caught.value.status_code == 502
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "api_error",
            "message": "The provider's answer was not a chat completion.",
        },
    }
    assert caught.value.response.headers["x-switchboard-cost-usd"] == "0.0000000000"
    record = UsageRecord.objects.get()
    assert (record.status, record.cost_usd) == (UsageRecord.Status.UPSTREAM_ERROR, 0)
    assert Reservation.objects.get().state == Reservation.State.VOIDED
    assert wallet_balance_usd(organization_id=org.pk) == 10
    assert wallet_balance_usd(organization_id=other.pk) == 10


def test_a_mistral_reasoning_answer_is_given_as_its_text(gateway_url, upstreams):
    # Magistral answers `content` as parts (its thinking, then its text), whole and streamed;
    # Anthropic's text block is the text parts, as Anthropic's own answers leave thinking out
    # unless it was asked for.
    _, key = make_key(make_org(credit_usd="10"))
    upstreams.openai.answer_next(chat_answer({"content": MISTRAL_REASONING_PARTS}))
    upstreams.openai.send_chunk_next(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": MISTRAL_REASONING_PARTS}}],
        }
    )
    ask: list[anthropic.types.MessageParam] = [{"role": "user", "content": QUESTION}]

    whole = client(gateway_url, key).messages.create(model="gpt-test", max_tokens=50, messages=ask)
    with client(gateway_url, key).messages.stream(
        model="gpt-test", max_tokens=50, messages=ask
    ) as stream:
        streamed = "".join(stream.text_stream)

    assert [(b.type, getattr(b, "text", None)) for b in whole.content] == [("text", "Paris.")]
    assert "Paris." in streamed
    assert "capital" not in streamed and "thinking" not in streamed
    assert UsageRecord.objects.filter(status=UsageRecord.Status.OK).count() == 2


def test_the_key_may_come_as_a_bearer_token(gateway_url, upstreams):
    _, key = make_key(make_org(credit_usd="10"))

    response = httpx.post(
        f"{gateway_url}/messages",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "gpt-test",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )

    assert response.status_code == 200
    assert response.json()["type"] == "message"


def test_a_bad_key_gets_anthropics_authentication_error(gateway_url, upstreams):
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client(gateway_url, "sk-sb-not-a-key").messages.create(
            model="gpt-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )

    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert caught.value.response.headers["x-request-id"].startswith("req_")
    assert upstreams.openai.calls == []


def test_an_unknown_model_gets_anthropics_not_found_error(gateway_url, upstreams):
    _, key = make_key(make_org(credit_usd="10"))

    with pytest.raises(anthropic.NotFoundError) as caught:
        client(gateway_url, key).messages.create(
            model="no-such-model", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )

    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "The model 'no-such-model' does not exist.",
        },
    }


def test_a_missing_max_tokens_gets_anthropics_invalid_request_error(gateway_url, upstreams):
    _, key = make_key(make_org(credit_usd="10"))

    response = httpx.post(
        f"{gateway_url}/messages",
        headers={"x-api-key": key},
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
    )

    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    assert response.headers["x-request-id"].startswith("req_")
    assert upstreams.openai.calls == []
    assert not UsageRecord.objects.exists()


@pytest.mark.parametrize("stream", ["true", 1, {}])
def test_a_stream_flag_that_is_not_a_boolean_gets_anthropics_invalid_request_error(
    gateway_url, upstreams, stream
):
    # It was read as false: a client that meant to stream got a whole answer, and was charged.
    _, key = make_key(make_org(credit_usd="10"))

    response = post_message(gateway_url, key, stream=stream)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "stream" in response.json()["error"]["message"]
    assert upstreams.openai.calls == []


def test_insufficient_credit_gets_402_in_anthropics_shape(gateway_url, upstreams):
    org = make_org(credit_usd=None)
    _, key = make_key(org)

    with pytest.raises(anthropic.APIStatusError) as caught:
        client(gateway_url, key).messages.create(
            model="claude-test", max_tokens=50, messages=[{"role": "user", "content": "hi"}]
        )

    assert caught.value.status_code == 402
    body: Any = caught.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "billing_error"
    assert "credit" in body["error"]["message"]
    assert upstreams.anthropic.calls == []
    assert not Reservation.objects.exists()


def test_an_answer_that_cannot_be_written_after_the_charge_is_a_502_carrying_the_charge(
    gateway_url, upstreams
):
    # The answer is translated after the request is settled. Tool arguments nested deeper than
    # Python's json can read fail that translation: the usage is charged all the same (the
    # provider charged for it), so the client learns the charge, and that a retry would be
    # charged again, rather than a 500 saying 0.
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    make_key(make_org(credit_usd="10"))  # another organisation, never charged
    call: dict[str, object] = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": "[" * 100_000}
    upstreams.openai.fail_next(
        200,
        body={
            "id": "chatcmpl-deep",
            "object": "chat.completion",
            "model": "gpt-test-upstream",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                    "finish_reason": "tool_calls",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
        },
    )
    sdk = anthropic.Anthropic(base_url=gateway_url.removesuffix("/v1"), api_key=key)

    with pytest.raises(anthropic.APIStatusError) as caught:
        sdk.messages.create(
            model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": QUESTION}]
        )

    response = caught.value.response
    record = UsageRecord.objects.get()  # one call: the SDK was told not to retry
    assert len(upstreams.openai.calls) == 1
    assert response.status_code == 502
    assert response.headers["x-should-retry"] == "false"
    body: Any = caught.value.body
    assert (body["type"], body["error"]["type"]) == ("error", "api_error")
    assert "charged" in body["error"]["message"]
    assert response.headers["request-id"] == response.headers["x-request-id"] == record.request_id
    expected = usage_cost_usd(price=PRICE, input_tokens=12, output_tokens=30)
    assert record.cost_usd == expected > 0
    assert record.status == UsageRecord.Status.OK
    assert Decimal(response.headers["x-switchboard-cost-usd"]) == expected
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - expected


def test_a_provider_addressing_field_is_refused(gateway_url, upstreams):
    _, key = make_key(make_org(credit_usd="10"))

    response = post_message(gateway_url, key, metadata={"base_url": "http://example.com"})

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert upstreams.openai.calls == []


@pytest.fixture(scope="module")
def _slow_server() -> Iterator[FakeProvider]:
    # Stopped with the module: the abandoned stream is still being generated when a test ends.
    with FakeProvider(chunk_interval=0.3) as provider:
        yield provider


@pytest.fixture
def slow_model(_slow_server: FakeProvider, monkeypatch: pytest.MonkeyPatch, transactional_db):
    """A model `gpt-slow` whose OpenAI-style upstream streams a word every 0.3 s."""
    _slow_server.reset()
    monkeypatch.setenv(OPENAI_KEY_ENV, SECRET)
    catalog_load(
        data={
            "providers": [
                {
                    "name": "slow",
                    "kind": "openai",
                    "base_url": _slow_server.base_url,
                    "api_key_env": OPENAI_KEY_ENV,
                }
            ],
            "models": [
                {
                    "name": "gpt-slow",
                    "routes": [{"provider": "slow", "upstream_model": "gpt-slow-upstream"}],
                    "price": {"input": "3.00", "output": "15.00"},
                }
            ],
        }
    )
    return _slow_server


def test_a_client_that_hangs_up_midway_is_settled_and_the_upstream_closed(gateway_url, slow_model):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    deltas = 0

    with (
        httpx.Client(timeout=10) as http,
        http.stream(
            "POST",
            f"{gateway_url}/messages",
            headers={"x-api-key": key},
            json={
                "model": "gpt-slow",
                "max_tokens": 50,
                "stream": True,
                "messages": [{"role": "user", "content": QUESTION}],
            },
        ) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            deltas += line == "event: content_block_delta"
            if deltas == 3:
                break

    deadline = time.monotonic() + 10
    while not (
        UsageRecord.objects.exists()
        and not Reservation.objects.filter(state=Reservation.State.HELD).exists()
    ):
        assert time.monotonic() < deadline, "the abandoned stream was never settled"
        time.sleep(0.02)
    server = slow_model._server
    assert server is not None
    deadline = time.monotonic() + 2  # well before the upstream would finish (3 s and more)
    while server._server.server_state.connections:
        assert time.monotonic() < deadline, "the upstream request was never closed"
        time.sleep(0.02)
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.output_tokens >= 3
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


# --- the usage a stream announces ------------------------------------------------------------


def test_message_start_announces_the_prompt_estimate(gateway_url, upstreams):
    _, key = make_key(make_org(credit_usd="10"))
    request = {
        "model": "gpt-test",
        "max_tokens": 50,
        "stream": True,
        "messages": [{"role": "user", "content": QUESTION}],
    }

    with httpx.stream(
        "POST",
        f"{gateway_url}/messages",
        headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        json=request,
    ) as response:
        # Read to the end: the request is settled by then (a hang-up settles it later).
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]

    start = json.loads(lines[0].removeprefix("data: "))
    assert start["type"] == "message_start"
    estimate = estimate_prompt_tokens(request_to_openai(request)["messages"])
    assert start["message"]["usage"]["input_tokens"] == estimate > 0


def test_a_translated_stream_without_usage_ends_with_the_usage_charged(gateway_url, upstreams):
    """No usage from an OpenAI-style upstream: the final message reports the estimate the
    wallet was charged, input tokens included."""
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    upstreams.openai.omit_usage_next()

    with client(gateway_url, key).messages.stream(
        model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": QUESTION}]
    ) as stream:
        final = stream.get_final_message()

    record = UsageRecord.objects.get()
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert final.usage.input_tokens == record.input_tokens > 0
    assert final.usage.output_tokens == record.output_tokens > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd


def test_a_process_at_capacity_answers_anthropics_overloaded_error(
    gateway_url, upstreams, settings
):
    settings.GATEWAY_MAX_REQUESTS_PER_PROCESS = 1
    _, key = make_key(make_org(credit_usd="10"))
    upstreams.openai.delay_next(2)
    answers: list[anthropic.types.Message] = []
    slow = threading.Thread(
        target=lambda: answers.append(
            client(gateway_url, key).messages.create(
                model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": QUESTION}]
            )
        )
    )
    slow.start()
    deadline = time.monotonic() + 10
    while not upstreams.openai.calls:  # the first request holds the only slot
        assert time.monotonic() < deadline
        time.sleep(0.01)

    with pytest.raises(anthropic.APIStatusError) as caught:
        client(gateway_url, key).messages.create(
            model="gpt-test", max_tokens=50, messages=[{"role": "user", "content": QUESTION}]
        )

    slow.join(10)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "overloaded_error",
            "message": "This gateway process is serving as many requests as it is allowed to; "
            "retry in a moment.",
        },
    }
    assert len(answers) == 1  # the request holding the slot was served
