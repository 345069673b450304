"""An upstream that sends its last events and drops the connection at once, read by a gateway
that gets to them late (a loaded machine): the events already received are relayed, and
charged, before the break is reported."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from billing.models import Reservation, UsageRecord
from billing.money import Price, usage_cost_usd
from billing.selectors import wallet_balance_usd
from gateway.providers import openai as openai_adapter
from gateway.providers.base import estimate_tokens
from gateway.selectors import RouteEntry
from tests.factories import make_key, make_org
from tests.fakes.provider import reply_for
from tests.gateway.late_reading import until_the_transport_saw_the_break

PRICE = Price(input_per_mtok_usd=Decimal("0.50"), output_per_mtok_usd=Decimal("1.50"))
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello to the switchboard operator please"},
]
REPLY = reply_for(MESSAGES, None)
SENT_BEFORE_THE_CUT = 5

EventReader = Callable[..., AsyncIterator[Any]]


def reading_late(read: EventReader) -> EventReader:
    """`read`, starting only once the upstream's whole stream, cut included, is in the
    gateway's transport: the gateway gets to the body after the upstream has gone."""

    async def late(
        route: RouteEntry, response: aiohttp.ClientResponse, **options: Any
    ) -> AsyncIterator[Any]:
        await until_the_transport_saw_the_break(response)
        async for data in read(route, response, **options):
            yield data

    return late


@pytest.fixture
def late_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(openai_adapter, "event_data", reading_late(openai_adapter.event_data))


def test_events_sent_before_an_immediate_cut_reach_the_client_and_are_charged(
    gateway_url, catalog, fake_provider, late_gateway
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    other_org = make_org(credit_usd="10")
    fake_provider.cut_stream_after(SENT_BEFORE_THE_CUT)
    received: list[str] = []

    stream = openai.OpenAI(
        base_url=gateway_url, api_key=key, max_retries=0
    ).chat.completions.create(model="fake-small", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    text = "".join(received)
    assert text == " ".join(REPLY.split()[:SENT_BEFORE_THE_CUT])
    assert caught.value.code == "upstream_stream_failed"
    record = UsageRecord.objects.get()
    assert record.organization_id == org.pk
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    output_tokens = max(estimate_tokens(text), SENT_BEFORE_THE_CUT)
    assert record.output_tokens == output_tokens
    assert record.cost_usd == usage_cost_usd(
        price=PRICE, input_tokens=record.input_tokens, output_tokens=output_tokens
    )
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd
    assert wallet_balance_usd(organization_id=other_org.pk) == Decimal("10")
    assert Reservation.objects.get().state == Reservation.State.SETTLED
