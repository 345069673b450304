"""Failover: retryable failures before the first byte move on to the model's next route, or
retry the same route after a short Retry-After; nothing is retried after the first byte.

Each scripted fault ends with the expected status or error event, the expected route attempts,
and a settled, correctly labelled usage record."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from billing.models import Reservation, UsageRecord
from billing.selectors import wallet_balance_usd
from gateway.services import catalog_load
from portal.models import Organization
from tests.factories import make_key, make_org
from tests.fakes.provider import MISTRAL_REASONING_PARTS, FakeProvider, chat_answer, tool_call
from tests.gateway.metering import sdk

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "route me somewhere that works"}
]


@pytest.fixture
def three_routes(catalog, settings):
    settings.GATEWAY_MAX_ATTEMPTS = 3
    catalog["models"][0]["routes"] = [
        {"provider": "fake", "upstream_model": f"deployment-{n}"} for n in (1, 2, 3)
    ]
    catalog_load(data=catalog)
    return catalog


def upstream_models(fake_provider) -> list[str]:
    return [call.json["model"] for call in fake_provider.calls]


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (500, {}),
        (503, {}),
        (429, {}),
        # A Retry-After longer than GATEWAY_MAX_RETRY_AFTER_SECONDS: better another route.
        (429, {"Retry-After": "30"}),
        (503, {"Retry-After": "30"}),
    ],
)
def test_a_retryable_failure_moves_to_the_next_route(
    gateway_url, three_routes, fake_provider, status, headers
):
    org = make_org()
    _, key = make_key(org)
    fake_provider.fail_next(status, headers=headers)

    raw = sdk(gateway_url, key).chat.completions.with_raw_response.create(
        model="fake-small", messages=MESSAGES
    )

    assert raw.parse().choices[0].message.content
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-2"]
    record = UsageRecord.objects.get(request_id=raw.headers["x-request-id"])
    assert (record.upstream_model, record.attempts, record.status) == ("deployment-2", 2, "ok")
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert record.cost_usd > 0


# --- answers the gateway cannot read ---------------------------------------------------------

# A call of each OpenAI-style endpoint to the model `fake-small`, through the official SDK.
# Each takes an openai.OpenAI, or its `with_raw_response` view.
ENDPOINT_CALLS: dict[str, Callable[[Any], Any]] = {
    "chat": lambda client: client.chat.completions.create(model="fake-small", messages=MESSAGES),
    "completions": lambda client: client.completions.create(model="fake-small", prompt="hi"),
    "embeddings": lambda client: client.embeddings.create(model="fake-small", input="hi"),
}
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
# Raw bytes: what json.dumps cannot write.
NOT_JSON = b"{not json"
TOO_DEEP = b"[" * 100_000 + b"]" * 100_000  # past the json module's recursion limit
# 200 answers that are not the endpoint's shape: charged as they were and passed on, or
# a 500 when the usage had to be estimated from them.
UNREADABLE_ANSWERS = (
    [
        pytest.param(endpoint, answer, id=f"{endpoint}-{name}")
        for endpoint in ENDPOINT_CALLS
        for name, answer in [("not_json", NOT_JSON), ("too_deep", TOO_DEEP), ("a_list", [])]
    ]
    + [
        pytest.param("chat", {"choices": 5, "usage": USAGE}, id="chat-choices_not_a_list"),
        pytest.param("chat", {"choices": [7], "usage": USAGE}, id="chat-choice_not_an_object"),
        pytest.param("chat", {"choices": [{"message": None}]}, id="chat-message_null"),
        pytest.param("chat", {"choices": [{"message": "hi"}]}, id="chat-message_a_string"),
        pytest.param(
            "completions", {"choices": "hi", "usage": USAGE}, id="completions-choices_text"
        ),
        pytest.param("completions", {"choices": [None]}, id="completions-choice_null"),
        pytest.param("embeddings", {"data": {"embedding": [0.5]}}, id="embeddings-data_an_object"),
        pytest.param("embeddings", {"data": [[0.5]], "usage": USAGE}, id="embeddings-item_a_list"),
        pytest.param("embeddings", {"data": [{"embedding": None}]}, id="embeddings-embedding_null"),
        pytest.param(
            "embeddings", {"data": [{"embedding": {"x": 0.5}}]}, id="embeddings-embedding_an_object"
        ),
        pytest.param(
            "embeddings", {"data": [{"embedding": 0.5}], "usage": USAGE}, id="embeddings-a_number"
        ),
        pytest.param(
            "completions",
            {"choices": [{"text": 5}], "usage": USAGE},
            id="completions-text_a_number",
        ),
        pytest.param(
            "completions", {"choices": [{"text": None}], "usage": USAGE}, id="completions-text_null"
        ),
    ]
    + [
        # Below the choice: what the SDK's model (or /v1/messages' translation) reads.
        pytest.param("chat", chat_answer(message), id=f"chat-{name}")
        for name, message in list[tuple[str, dict[str, Any]]](
            [
                ("content_a_number", {"content": 5}),
                ("content_an_object", {"content": {"text": "hi"}}),
                ("content_parts_not_objects", {"content": ["hi"]}),
                ("tool_calls_an_object", {"content": None, "tool_calls": {"id": "call_1"}}),
                ("tool_call_a_string", {"content": None, "tool_calls": ["call_1"]}),
                ("function_a_string", {"content": None, "tool_calls": [tool_call("get_weather")]}),
                ("function_null", {"content": None, "tool_calls": [tool_call(None)]}),
                ("name_a_number", {"tool_calls": [tool_call({"name": 5, "arguments": "{}"})]}),
                ("name_missing", {"tool_calls": [tool_call({"arguments": "{}"})]}),
                (
                    "arguments_an_object",
                    {"tool_calls": [tool_call({"name": "f", "arguments": {}})]},
                ),
            ]
        )
    ]
    + [
        pytest.param(
            "chat", chat_answer({"content": "hi"}, finish_reason=5), id="chat-finish_a_number"
        )
    ]
)
WEATHER_CALL = tool_call({"name": "get_weather", "arguments": '{"city": "Paris"}'})
CUSTOM_CALL = {"id": "call_2", "type": "custom", "custom": {"name": "grep", "input": "x"}}
# 200 answers that are unusual but the API's: passed on as they are, and charged.
READABLE_ANSWERS = [
    pytest.param("chat", chat_answer(message), id=f"chat-{name}")
    for name, message in list[tuple[str, dict[str, Any]]](
        [
            ("content_null_with_a_tool_call", {"content": None, "tool_calls": [WEATHER_CALL]}),
            ("refusal", {"content": None, "refusal": "I can't help with that."}),
            (
                "audio",
                {"content": None, "audio": {"id": "audio_1", "data": "UklG", "transcript": "hi"}},
            ),
            ("unknown_fields", {"content": "hi", "reasoning_content": "hmm", "x_vendor": [1]}),
            ("custom_tool_call", {"content": None, "tool_calls": [CUSTOM_CALL]}),
            ("mistral_reasoning_parts", {"content": MISTRAL_REASONING_PARTS}),
        ]
    )
] + [
    pytest.param(
        "chat",
        {**chat_answer({"content": "hi"}), "service_tier": "default", "x_vendor": {"a": 1}},
        id="chat-logprobs_and_unknown_fields",
    ),
    pytest.param(
        "completions",
        {"choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}]},
        id="completions-no_finish_reason",
    ),
    pytest.param(
        "embeddings",
        {"data": [{"object": "embedding", "index": 0, "embedding": "AAAAPw=="}], "usage": USAGE},
        id="embeddings-base64",
    ),
]


def _answered_after(
    gateway_url: str, fake_provider: FakeProvider, endpoint: str, answer: object
) -> tuple[Organization, Any]:
    """Call `endpoint` with a new organisation's key, the first route answering `answer`:
    (the organisation, the SDK's raw response, parsed)."""
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.answer_next(answer)
    raw = ENDPOINT_CALLS[endpoint](sdk(gateway_url, key).with_raw_response)
    raw.parse()
    return org, raw


@pytest.mark.parametrize(("endpoint", "answer"), UNREADABLE_ANSWERS)
def test_an_unreadable_answer_moves_to_the_next_route(
    gateway_url, three_routes, fake_provider, endpoint, answer
):
    org, raw = _answered_after(gateway_url, fake_provider, endpoint, answer)

    assert raw.status_code == 200
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-2"]
    record = UsageRecord.objects.get(request_id=raw.headers["x-request-id"])
    assert (record.upstream_model, record.attempts, record.status) == ("deployment-2", 2, "ok")
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    # Charged once, for the answer delivered.
    assert wallet_balance_usd(organization_id=org.pk) == 10 - record.cost_usd


@pytest.mark.parametrize(("endpoint", "answer"), READABLE_ANSWERS)
def test_an_unusual_answer_of_the_apis_shape_is_passed_on_and_charged(
    gateway_url, three_routes, fake_provider, endpoint, answer
):
    org, raw = _answered_after(gateway_url, fake_provider, endpoint, answer)

    assert raw.status_code == 200
    assert {k: v for k, v in raw.http_response.json().items() if k != "model"} == {
        k: v for k, v in answer.items() if k != "model"
    }
    assert upstream_models(fake_provider) == ["deployment-1"]
    record = UsageRecord.objects.get(request_id=raw.headers["x-request-id"])
    assert (record.attempts, record.status, record.cost_usd > 0) == (1, "ok", True)
    assert wallet_balance_usd(organization_id=org.pk) == 10 - record.cost_usd


@pytest.mark.parametrize("endpoint", [*ENDPOINT_CALLS, "messages"])
def test_unreadable_answers_on_every_route_get_502_and_are_not_charged(
    gateway_url, three_routes, fake_provider, endpoint
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    other_org = make_org(credit_usd="10")
    answers: tuple[object, ...] = (TOO_DEEP, NOT_JSON, [])
    for answer in answers:
        fake_provider.answer_next(answer)

    if endpoint == "messages":
        client = anthropic.Anthropic(
            base_url=gateway_url.removesuffix("/v1"), api_key=key, max_retries=0
        )
        with pytest.raises(anthropic.APIStatusError) as anthropic_error:
            client.messages.create(
                model="fake-small", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
            )
        assert anthropic_error.value.status_code == 502
        body = anthropic_error.value.body
        assert isinstance(body, dict)
        assert body["type"] == "error"
        assert body["error"]["type"] == "api_error"
        response = anthropic_error.value.response
    else:
        with pytest.raises(openai.APIStatusError) as openai_error:
            ENDPOINT_CALLS[endpoint](sdk(gateway_url, key))
        assert openai_error.value.status_code == 502
        assert openai_error.value.code == "upstream_failed"
        response = openai_error.value.response

    assert response.headers["x-switchboard-cost-usd"] == "0.0000000000"
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-2", "deployment-3"]
    record = UsageRecord.objects.get()
    assert (record.status, record.attempts, record.cost_usd) == ("upstream_error", 3, 0)
    assert Reservation.objects.get().state == Reservation.State.VOIDED  # the hold released
    assert wallet_balance_usd(organization_id=org.pk) == 10
    assert wallet_balance_usd(organization_id=other_org.pk) == 10


@pytest.mark.parametrize("status", [429, 503])
def test_a_short_retry_after_retries_the_same_route_after_the_wait(
    gateway_url, three_routes, fake_provider, settings, status
):
    settings.GATEWAY_MAX_RETRY_AFTER_SECONDS = 2
    _, key = make_key(make_org())
    fake_provider.fail_next(status, headers={"Retry-After": "1"})
    started = time.monotonic()

    completion = sdk(gateway_url, key).chat.completions.create(
        model="fake-small", messages=MESSAGES
    )

    assert time.monotonic() - started >= 1.0
    assert completion.choices[0].message.content
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-1"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("deployment-1", 2, "ok")


def test_retries_after_retry_after_are_bounded_by_the_attempts(
    gateway_url, three_routes, fake_provider, settings
):
    settings.GATEWAY_MAX_ATTEMPTS = 3
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.fail_next(429, headers={"Retry-After": "0"}, times=5)

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert caught.value.status_code == 502
    assert upstream_models(fake_provider) == ["deployment-1"] * 3
    record = UsageRecord.objects.get()
    assert (record.status, record.attempts, record.cost_usd) == ("upstream_error", 3, 0)
    assert wallet_balance_usd(organization_id=org.pk) == 10


def test_an_unreachable_route_moves_to_the_next(gateway_url, three_routes, fake_provider):
    catalog = three_routes
    catalog["providers"].append(
        {"name": "down", "kind": "openai", "base_url": "http://127.0.0.1:9/v1"}
    )
    catalog["models"][0]["routes"].insert(0, {"provider": "down", "upstream_model": "gone"})
    catalog_load(data=catalog)
    _, key = make_key(make_org())

    sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    record = UsageRecord.objects.get()
    assert (record.provider, record.upstream_model, record.attempts) == ("fake", "deployment-1", 2)
    assert (record.status, record.usage_source) == ("ok", "reported")


def test_the_attempts_are_bounded_and_the_last_failure_is_answered(
    gateway_url, three_routes, fake_provider, settings
):
    settings.GATEWAY_MAX_ATTEMPTS = 2
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.fail_next(500, times=3)

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert caught.value.status_code == 502
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-2"]
    record = UsageRecord.objects.get()
    assert (record.status, record.attempts, record.cost_usd) == ("upstream_error", 2, 0)
    assert wallet_balance_usd(organization_id=org.pk) == 10


@pytest.mark.parametrize("status", [400, 401])
def test_a_refusal_or_a_rejected_credential_does_not_fail_over(
    gateway_url, three_routes, fake_provider, status
):
    _, key = make_key(make_org())
    fake_provider.fail_next(status, body={"error": {"message": "no", "type": "x"}})

    with pytest.raises(openai.APIStatusError):
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert upstream_models(fake_provider) == ["deployment-1"]


def test_a_stream_fails_over_before_its_first_byte(gateway_url, three_routes, fake_provider):
    _, key = make_key(make_org())
    fake_provider.fail_next(502)

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model="fake-small", messages=MESSAGES, stream=True
        )
    )

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-2"]
    assert UsageRecord.objects.get().attempts == 2


@pytest.fixture
def impatient_first_route(three_routes, settings):
    """deployment-1 waits at most half a second for the provider's first byte."""
    three_routes["models"][0]["routes"][0]["timeouts"] = {"first_byte": 0.5}
    catalog_load(data=three_routes)
    return three_routes


@pytest.mark.parametrize("stream", [False, True])
def test_a_first_byte_timeout_fails_over(gateway_url, impatient_first_route, fake_provider, stream):
    _, key = make_key(make_org())
    fake_provider.delay_next(5)
    started = time.monotonic()

    if stream:
        chunks = list(
            sdk(gateway_url, key).chat.completions.create(
                model="fake-small", messages=MESSAGES, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert time.monotonic() - started < 4
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-2"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("deployment-2", 2, "ok")
    assert record.usage_source == UsageRecord.UsageSource.REPORTED


def test_nothing_is_retried_after_the_first_byte(gateway_url, three_routes, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.cut_stream_after(2)

    stream = sdk(gateway_url, key).chat.completions.create(
        model="fake-small", messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        list(stream)

    assert caught.value.code == "upstream_stream_failed"
    assert upstream_models(fake_provider) == ["deployment-1"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == (
        "deployment-1",
        1,
        "interrupted",
    )
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert wallet_balance_usd(organization_id=org.pk) == 10 - record.cost_usd


def test_a_stream_silent_past_its_idle_timeout_ends_with_an_error_event(
    gateway_url, three_routes, fake_provider
):
    three_routes["models"][0]["routes"][0]["timeouts"] = {"idle": 0.5}
    catalog_load(data=three_routes)
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.stall_stream_after(2, seconds=5)
    received: list[str] = []
    started = time.monotonic()

    stream = sdk(gateway_url, key).chat.completions.create(
        model="fake-small", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    assert time.monotonic() - started < 4
    assert caught.value.code == "upstream_stream_failed"
    assert len(received) == 2
    assert upstream_models(fake_provider) == ["deployment-1"]
    record = UsageRecord.objects.get()
    assert (record.attempts, record.status, record.usage_source) == (1, "interrupted", "estimated")
    assert record.output_tokens >= 2
    assert record.time_to_first_token_ms is not None
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == 10 - record.cost_usd


def test_a_stream_may_pause_longer_than_its_first_byte_timeout_within_its_idle_timeout(
    gateway_url, three_routes, fake_provider
):
    three_routes["models"][0]["routes"][0]["timeouts"] = {"first_byte": 0.3, "idle": 3}
    catalog_load(data=three_routes)
    _, key = make_key(make_org())
    fake_provider.stall_stream_after(2, seconds=1)

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model="fake-small", messages=MESSAGES, stream=True
        )
    )

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert upstream_models(fake_provider) == ["deployment-1"]
    record = UsageRecord.objects.get()
    assert (record.attempts, record.status, record.usage_source) == (1, "ok", "reported")


# --- route health: a route failing repeatedly is tried last for a cool-down ---------------


def fail_first_route_twice(gateway_url: str, key: str, fake_provider) -> None:
    """Two requests, each failing over from deployment-1 (500) to deployment-2."""
    for _ in range(2):
        fake_provider.fail_next(500)
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-2"] * 2
    fake_provider.calls.clear()


def test_a_route_failing_repeatedly_is_tried_last(
    gateway_url, three_routes, fake_provider, settings
):
    settings.GATEWAY_ROUTE_FAILURES_BEFORE_COOLDOWN = 2
    settings.GATEWAY_ROUTE_COOLDOWN_SECONDS = 600
    _, key = make_key(make_org(credit_usd="10"))
    fail_first_route_twice(gateway_url, key, fake_provider)

    raw = sdk(gateway_url, key).chat.completions.with_raw_response.create(
        model="fake-small", messages=MESSAGES
    )

    assert upstream_models(fake_provider) == ["deployment-2"]
    record = UsageRecord.objects.get(request_id=raw.headers["x-request-id"])
    assert (record.upstream_model, record.attempts, record.status) == ("deployment-2", 1, "ok")


def test_a_route_is_tried_first_again_after_its_cool_down(
    gateway_url, three_routes, fake_provider, settings
):
    settings.GATEWAY_ROUTE_FAILURES_BEFORE_COOLDOWN = 2
    settings.GATEWAY_ROUTE_COOLDOWN_SECONDS = 1
    _, key = make_key(make_org(credit_usd="10"))
    fail_first_route_twice(gateway_url, key, fake_provider)
    first_tried: list[str] = []
    deadline = time.monotonic() + 10

    while time.monotonic() < deadline:
        fake_provider.calls.clear()
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)
        first_tried.append(upstream_models(fake_provider)[0])
        if first_tried[-1] == "deployment-1":
            break
        time.sleep(0.1)

    assert first_tried[0] == "deployment-2"  # cooling down when the polling began
    assert first_tried[-1] == "deployment-1"
    assert upstream_models(fake_provider) == ["deployment-1"]  # and it answered


def test_a_success_forgets_a_routes_failures(gateway_url, three_routes, fake_provider, settings):
    settings.GATEWAY_ROUTE_FAILURES_BEFORE_COOLDOWN = 2
    settings.GATEWAY_ROUTE_COOLDOWN_SECONDS = 600
    _, key = make_key(make_org(credit_usd="10"))
    client = sdk(gateway_url, key)
    fake_provider.fail_next(500)
    client.chat.completions.create(model="fake-small", messages=MESSAGES)  # 1 failure
    client.chat.completions.create(model="fake-small", messages=MESSAGES)  # a success
    fake_provider.fail_next(500)
    client.chat.completions.create(model="fake-small", messages=MESSAGES)  # 1 failure again
    fake_provider.calls.clear()

    client.chat.completions.create(model="fake-small", messages=MESSAGES)

    assert upstream_models(fake_provider) == ["deployment-1"]
