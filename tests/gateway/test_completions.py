"""POST /v1/completions (legacy) end to end: the official openai SDK → Switchboard → the fake
provider over real HTTP, streamed and not, charged to the last unit."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from billing.models import Reservation, UsageRecord
from billing.money import Price, usage_cost_usd
from billing.selectors import wallet_balance_usd
from gateway.services import catalog_load
from tests.factories import make_key, make_org
from tests.fakes.provider import count_text_tokens, text_reply_for
from tests.gateway.metering import assert_charged_exactly, sdk

PRICE = Price(input_per_mtok_usd=Decimal("0.50"), output_per_mtok_usd=Decimal("1.50"))
PROMPT = "Once upon a time in a small switchboard office"


def test_it_answers_and_charges_the_exact_price(gateway_url, catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    raw = sdk(gateway_url, key).completions.with_raw_response.create(
        model="fake-small", prompt=PROMPT, max_tokens=7
    )
    completion = raw.parse()

    reply = text_reply_for(PROMPT, 7)
    assert completion.choices[0].text == reply
    assert completion.choices[0].finish_reason == "length"
    assert completion.model == "fake-small"
    [call] = fake_provider.calls
    assert (call.path, call.json["model"], call.json["max_tokens"]) == (
        "/v1/completions",
        "fake-small-upstream",
        7,
    )
    assert_charged_exactly(
        raw,
        org,
        price=PRICE,
        input_tokens=count_text_tokens(PROMPT),
        output_tokens=7,
        provider="fake",
        upstream_model="fake-small-upstream",
    )
    assert UsageRecord.objects.get().time_to_first_token_ms is not None


def test_without_max_tokens_it_asks_for_openais_default_of_16(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org())

    completion = sdk(gateway_url, key).completions.create(model="fake-small", prompt=PROMPT)

    assert fake_provider.calls[0].json["max_tokens"] == 16
    assert completion.choices[0].text == text_reply_for(PROMPT, 16)


def test_a_list_of_prompts_and_token_arrays_are_passed_through(gateway_url, catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    prompt = [[101, 102, 103], [7, 8]]

    raw = sdk(gateway_url, key).completions.with_raw_response.create(
        model="fake-small", prompt=prompt, max_tokens=4
    )

    assert fake_provider.calls[0].json["prompt"] == prompt
    assert [choice.text for choice in raw.parse().choices] == [
        text_reply_for("101 102 103", 4),
        text_reply_for("7 8", 4),
    ]
    assert_charged_exactly(
        raw,
        org,
        price=PRICE,
        input_tokens=5,
        output_tokens=8,
        provider="fake",
        upstream_model="fake-small-upstream",
    )


def test_it_streams_and_charges_the_reported_usage(gateway_url, catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    chunks = list(
        sdk(gateway_url, key).completions.create(
            model="fake-small",
            prompt=PROMPT,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert "".join(c.choices[0].text for c in chunks if c.choices) == text_reply_for(PROMPT, 6)
    assert {c.model for c in chunks} == {"fake-small"}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert fake_provider.calls[0].json["stream_options"] == {"include_usage": True}
    input_tokens = count_text_tokens(PROMPT)
    expected = usage_cost_usd(price=PRICE, input_tokens=input_tokens, output_tokens=6)
    record = UsageRecord.objects.get()
    assert (record.input_tokens, record.output_tokens, record.status) == (input_tokens, 6, "ok")
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert record.cost_usd == expected > 0
    assert chunks[-1].usage.model_extra is not None
    assert Decimal(chunks[-1].usage.model_extra["cost_usd"]) == expected
    assert record.time_to_first_token_ms is not None
    assert record.time_to_first_token_ms <= record.latency_ms
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - expected
    assert Reservation.objects.get().state == Reservation.State.SETTLED


@pytest.mark.parametrize(
    "choice",
    [
        pytest.param({"index": 0, "text": 5}, id="text_a_number"),
        pytest.param({"index": 0, "text": ["word"]}, id="text_a_list"),
        pytest.param({"index": 0, "text": "", "finish_reason": ["stop"]}, id="finish_a_list"),
    ],
)
def test_an_unreadable_chunk_ends_the_stream_with_an_error_event_and_is_charged(
    gateway_url, catalog, fake_provider, choice
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.send_chunk_next({"object": "text_completion", "choices": [choice]})
    received: list[str] = []

    stream = sdk(gateway_url, key).completions.create(
        model="fake-small", prompt=PROMPT, max_tokens=6, stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].text)

    assert "".join(received) == text_reply_for(PROMPT, 6).split()[0]
    assert caught.value.code == "upstream_stream_failed"
    record = UsageRecord.objects.get()
    assert (record.status, record.usage_source) == ("interrupted", "estimated")
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd
    assert Reservation.objects.get().state == Reservation.State.SETTLED


def test_a_stream_is_charged_even_when_the_client_did_not_ask_for_usage(
    gateway_url, catalog, fake_provider
):
    _, key = make_key(make_org())

    chunks = list(
        sdk(gateway_url, key).completions.create(
            model="fake-small", prompt=PROMPT, max_tokens=5, stream=True
        )
    )

    assert all(c.usage is None and c.choices for c in chunks)
    record = UsageRecord.objects.get()
    assert (record.output_tokens, record.usage_source) == (5, "reported")


def test_a_model_served_only_by_another_api_gets_a_clear_400(gateway_url, fake_provider):
    catalog_load(
        data={
            "providers": [
                {"name": "claude", "kind": "anthropic", "base_url": fake_provider.base_url}
            ],
            "models": [
                {
                    "name": "claude-like",
                    "routes": [{"provider": "claude", "upstream_model": "claude-x"}],
                    "price": {"input": "1", "output": "2"},
                }
            ],
        }
    )
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway_url, key).completions.create(model="claude-like", prompt=PROMPT)

    assert "legacy completions" in caught.value.message
    assert caught.value.response.headers["x-request-id"]
    assert fake_provider.calls == []
    assert not UsageRecord.objects.exists()
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "fake-small"}, "prompt"),
        ({"model": "fake-small", "prompt": []}, "prompt"),
        ({"model": "fake-small", "prompt": [1, "a"]}, "prompt"),
        ({"model": "fake-small", "prompt": "hi", "n": 0}, "n"),
        (
            {"model": "fake-small", "prompt": "hi", "max_completion_tokens": 2},
            "max_completion_tokens",
        ),
        ({"model": "fake-small", "prompt": "hi", "stream": "yes"}, "stream"),
        ({"model": "fake-small", "prompt": "hi", "api_base": "http://evil"}, "api_base"),
        ({"model": "fake-small", "prompt": "hi", "extra": {"base_url": "x"}}, "extra.base_url"),
    ],
)
def test_a_bad_body_gets_400_in_openai_shape(gateway_url, catalog, fake_provider, body, param):
    _, key = make_key(make_org())

    response = httpx.post(
        f"{gateway_url}/completions", headers={"Authorization": f"Bearer {key}"}, json=body
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert fake_provider.calls == []


def test_n_is_reserved_for_every_choice(gateway_url, catalog, fake_provider):
    # 16 tokens x 3 choices at 1.50/M does not fit in this wallet; 16 tokens would.
    org = make_org(credit_usd="0.00006")
    _, key = make_key(org)

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).completions.create(model="fake-small", prompt="hi", n=3)

    assert caught.value.status_code == 402
    sdk(gateway_url, key).completions.create(model="fake-small", prompt="hi")


def test_every_prompt_of_a_list_is_reserved_for_every_choice(gateway_url, catalog, fake_provider):
    # A list of prompts gets n choices each: 3 prompts x 16 tokens at 1.50/M does not fit in
    # this wallet, one prompt does. Reserving one prompt's worth let a request of many
    # prompts overdraw the wallet by the rest.
    org = make_org(credit_usd="0.00006")
    _, key = make_key(org)

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).completions.create(model="fake-small", prompt=["hi", "hi", "hi"])

    assert caught.value.status_code == 402
    assert fake_provider.calls == []
    sdk(gateway_url, key).completions.create(model="fake-small", prompt=["hi"])
    assert wallet_balance_usd(organization_id=org.pk) >= 0


def test_the_demo_provider_completes_offline_streamed_and_not(gateway_url, fake_provider):
    catalog_load(
        data={
            "providers": [{"name": "demo", "kind": "demo"}],
            "models": [
                {
                    "name": "demo-echo",
                    "routes": [{"provider": "demo", "upstream_model": "demo-echo"}],
                    "price": {"input": "0.50", "output": "1.50"},
                }
            ],
        }
    )
    _, key = make_key(make_org())
    client = sdk(gateway_url, key)

    whole = client.completions.create(model="demo-echo", prompt="knock knock")
    chunks = list(client.completions.create(model="demo-echo", prompt="knock knock", stream=True))

    assert whole.choices[0].text == "Demo reply to: knock knock"
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert list(UsageRecord.objects.values_list("status", "usage_source")) == [
        ("ok", "reported"),
        ("ok", "reported"),
    ]
