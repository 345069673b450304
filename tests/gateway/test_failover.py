"""Failover: retryable failures before the first byte move on to the model's next route."""

from __future__ import annotations

import openai
import pytest

from billing.models import UsageRecord
from billing.selectors import wallet_balance_usd
from gateway.services import catalog_load
from tests.factories import make_key, make_org
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


@pytest.mark.parametrize("status", [500, 503, 429])
def test_a_retryable_failure_moves_to_the_next_route(
    gateway_url, three_routes, fake_provider, status
):
    org = make_org()
    _, key = make_key(org)
    fake_provider.fail_next(status, headers={"Retry-After": "1"})

    completion = sdk(gateway_url, key).chat.completions.create(
        model="fake-small", messages=MESSAGES
    )

    assert completion.choices[0].message.content
    assert upstream_models(fake_provider) == ["deployment-1", "deployment-2"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("deployment-2", 2, "ok")
    assert record.cost_usd > 0


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
