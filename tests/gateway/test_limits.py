"""Per-key limits: allowed models, expiry, requests and tokens per minute and concurrency,
held across gateway processes through Redis (and in-process in the embedded mode)."""

from __future__ import annotations

import asyncio
import json
import secrets
from datetime import timedelta
from decimal import Decimal

import httpx
import openai
import pytest
from django.utils import timezone

from billing.models import Reservation, SpendCap
from billing.services import credit_grant
from gateway import limits
from gateway.errors import RateLimited
from gateway.limits import RateLimits
from portal.logs import new_request_id
from portal.models import ApiKey
from portal.redis_clients import redis_client
from tests.factories import make_key, make_org

BODY = json.dumps(
    {"model": "fake-small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
).encode()


def limited_key(**limits: object) -> str:
    api_key, secret = make_key(make_org())
    ApiKey.objects.filter(pk=api_key.pk).update(**limits)
    return secret


async def _burst(urls: list[str], key: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await asyncio.gather(
            *(
                client.post(
                    f"{urls[n % len(urls)]}/chat/completions",
                    content=BODY,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                )
                for n in range(count)
            )
        )


def test_a_key_may_only_use_its_allowed_models(gateway_url, catalog, fake_provider):
    key = limited_key(allowed_models=["some-other-model"])

    with pytest.raises(openai.PermissionDeniedError) as caught:
        openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0).chat.completions.create(
            model="fake-small", messages=[{"role": "user", "content": "hi"}]
        )

    assert caught.value.code == "model_not_allowed"
    assert fake_provider.calls == []


def test_an_expired_key_gets_401(gateway_url, catalog, fake_provider):
    key = limited_key(expires_at=timezone.now() - timedelta(seconds=1))

    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0).chat.completions.create(
            model="fake-small", messages=[{"role": "user", "content": "hi"}]
        )

    assert "expired" in caught.value.message


def test_requests_per_minute_hold_across_two_processes(start_gateways, catalog, fake_provider):
    gateways = start_gateways(2)
    key = limited_key(requests_per_minute=5)
    bystander = limited_key(requests_per_minute=5)

    responses = asyncio.run(_burst(gateways.urls, key, 12))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 5 + [429] * 7
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Refused requests never reserved credit.
    assert Reservation.objects.count() == 5
    # Another key's budget is its own.
    assert [r.status_code for r in asyncio.run(_burst(gateways.urls, bystander, 2))] == [200, 200]


def test_concurrent_requests_hold_across_two_processes(start_gateways, catalog, fake_provider):
    gateways = start_gateways(2)
    fake_provider.latency = 1.0  # every admitted request stays in flight during the burst
    key = limited_key(max_concurrent_requests=2)

    statuses = sorted(r.status_code for r in asyncio.run(_burst(gateways.urls, key, 6)))

    assert statuses == [200, 200, 429, 429, 429, 429]
    # The slots are free again once the requests ended.
    fake_provider.latency = 0.0
    assert [r.status_code for r in asyncio.run(_burst(gateways.urls, key, 2))] == [200, 200]


@pytest.mark.parametrize("redis", [True, False], ids=["redis", "in-process"])
def test_a_request_refused_for_concurrency_does_not_count_against_requests_per_minute(
    gateway_url, catalog, fake_provider, settings, redis
):
    if not redis:
        settings.REDIS_URL = ""
    fake_provider.latency = 1.0  # the admitted request stays in flight during the burst
    key = limited_key(max_concurrent_requests=1, requests_per_minute=3)

    statuses = sorted(r.status_code for r in asyncio.run(_burst([gateway_url], key, 6)))

    assert statuses == [200, 429, 429, 429, 429, 429]
    # One request was served: two more fit in the minute.
    fake_provider.latency = 0.0
    statuses = [asyncio.run(_burst([gateway_url], key, 1))[0].status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_tokens_per_minute_refuse_once_the_window_is_used(gateway_url, catalog, fake_provider):
    key = limited_key(tokens_per_minute=10)
    fake_provider.reported_usage = (8, 5)  # 13 tokens: more than the whole minute's budget

    first, second = (asyncio.run(_burst([gateway_url], key, 1))[0] for _ in range(2))

    assert first.status_code == 200
    assert second.status_code == 429
    assert "tokens per minute" in second.json()["error"]["message"]


def test_tokens_per_minute_hold_against_a_concurrent_burst_across_two_processes(
    start_gateways, catalog, fake_provider
):
    gateways = start_gateways(2)
    fake_provider.latency = 0.5
    fake_provider.reported_usage = (30, 20)  # 50 tokens a request
    key = limited_key(tokens_per_minute=100)

    statuses = [r.status_code for r in asyncio.run(_burst(gateways.urls, key, 20))]

    # However many arrive at once, the minute holds the limit and one request's tokens at most.
    served = statuses.count(200)
    assert 1 <= served <= 3, statuses
    assert statuses.count(429) == 20 - served


def test_a_request_refused_after_admission_holds_none_of_the_minute_s_tokens(
    gateway_url, catalog, fake_provider
):
    api_key, key = make_key(make_org(credit_usd=None))
    ApiKey.objects.filter(pk=api_key.pk).update(tokens_per_minute=100)

    refused = [asyncio.run(_burst([gateway_url], key, 1))[0].status_code for _ in range(3)]
    credit_grant(organization=api_key.organization, amount_usd=Decimal(1), reason="top-up")
    [served] = asyncio.run(_burst([gateway_url], key, 1))

    assert refused == [402, 402, 402]
    assert served.status_code == 200


class _Clock:
    """gateway/limits.py's clock, moved by the test: its windows are a minute long."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("redis", [True, False], ids=["redis", "in-process"])
def test_a_tokens_per_minute_refusal_says_when_a_retry_is_admitted(settings, monkeypatch, redis):
    if not redis:
        settings.REDIS_URL = ""
    clock = _Clock(1_800_000_000.0)
    monkeypatch.setattr(limits, "time", clock)
    api_key_id = 10**12 + secrets.randbelow(10**9)  # not a real key: no other test's window
    tpm = RateLimits(tokens_per_minute=10)

    async def served(tokens: int) -> None:
        request_id = new_request_id()
        admission = await limits.limits_admit(
            api_key_id=api_key_id, request_id=request_id, limits=tpm, tokens=tokens
        )
        await limits.limits_release(
            api_key_id=api_key_id,
            request_id=request_id,
            limits=tpm,
            admission=admission,
            tokens=tokens,
        )

    async def scenario() -> tuple[int, bool]:
        await served(5)  # 5 of the minute's 10 tokens
        clock.now += 10
        await served(13)  # admitted under the limit, and goes past it
        clock.now += 10
        with pytest.raises(RateLimited) as refused:
            await served(1)
        retry_after = refused.value.retry_after_seconds
        clock.now += retry_after
        try:
            await served(1)
        except RateLimited:
            return retry_after, False
        return retry_after, True

    retry_after, admitted = asyncio.run(scenario())

    # The first request's 5 tokens leaving is not enough: the second's 13 must leave too.
    assert (retry_after, admitted) == (50, True)


def _scripts_run(redis_url: str) -> int:
    stats = redis_client(redis_url).info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha"))


def test_a_key_limited_by_requests_per_minute_alone_makes_one_redis_call_a_request(
    gateway_url, catalog, fake_provider, settings
):
    key = limited_key(requests_per_minute=100)
    before = _scripts_run(settings.REDIS_URL)

    statuses = [asyncio.run(_burst([gateway_url], key, 1))[0].status_code for _ in range(3)]

    assert statuses == [200, 200, 200]
    # Admitted and counted; its release would have nothing to undo, so none is sent.
    assert _scripts_run(settings.REDIS_URL) - before == 3


def test_the_embedded_mode_limits_in_process(gateway_url, catalog, fake_provider, settings):
    settings.REDIS_URL = ""
    key = limited_key(requests_per_minute=2)

    statuses = [asyncio.run(_burst([gateway_url], key, 1))[0].status_code for _ in range(3)]

    assert statuses == [200, 200, 429]


def test_an_unreachable_redis_refuses_limited_keys_with_503(
    gateway_url, catalog, fake_provider, settings
):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    limited = limited_key(requests_per_minute=100)
    unlimited = limited_key()

    [refused] = asyncio.run(_burst([gateway_url], limited, 1))
    [served] = asyncio.run(_burst([gateway_url], unlimited, 1))

    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert served.status_code == 200
    assert len(fake_provider.calls) == 1


def test_a_spend_cap_too_small_for_the_worst_case_gets_402(gateway_url, catalog, fake_provider):
    api_key, secret = make_key(make_org(credit_usd="10"))
    SpendCap.objects.create(api_key=api_key, amount_usd=Decimal("0.000001"), window="day")

    [response] = asyncio.run(_burst([gateway_url], secret, 1))

    assert response.status_code == 402
    assert response.json()["error"]["code"] == "spend_cap_reached"
    assert "resets at" in response.json()["error"]["message"]
    assert fake_provider.calls == []
