"""Routing: ordered and weighted routes, and model aliases."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

import openai
import pytest

from billing.models import UsageRecord
from billing.money import Price
from gateway import routing
from gateway.routing import serveable_routes
from gateway.selectors import ModelEntry, RouteEntry
from gateway.services import catalog_load
from portal.models import ApiKey
from tests.factories import make_key, make_org
from tests.gateway.metering import sdk

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "balance me"}
]


def _model(routing_kind: str, weights: list[int]) -> ModelEntry:
    return ModelEntry(
        name="m",
        price=Price(input_per_mtok_usd=Decimal(1), output_per_mtok_usd=Decimal(1)),
        max_output_tokens=10,
        context_length=None,
        routes=tuple(
            RouteEntry(
                provider="p",
                kind="openai",
                base_url="http://127.0.0.1:1/v1",
                api_key_env="",
                upstream_model=f"r{n}",
                weight=weight,
            )
            for n, weight in enumerate(weights)
        ),
        routing=routing_kind,
    )


def _orders(model: ModelEntry, draws: int) -> list[list[str]]:
    return [
        [chosen.route.upstream_model for chosen in serveable_routes(model, streaming=False)]
        for _ in range(draws)
    ]


def test_weighted_routes_share_first_attempts_by_weight():
    routing._draw.seed(1234)
    draws = 4000

    orders = _orders(_model("weighted", [3, 1, 0]), draws)

    firsts = Counter(order[0] for order in orders)
    # Binomial(4000, 0.75): a standard deviation of about 27.
    assert abs(firsts["r0"] - 3000) < 150
    assert firsts["r0"] + firsts["r1"] == draws
    assert firsts["r2"] == 0  # weight 0: a fallback only
    # The others follow in catalog order, for failover.
    assert {tuple(order) for order in orders} == {("r0", "r1", "r2"), ("r1", "r0", "r2")}


def test_ordered_routes_keep_catalog_order_whatever_the_weights():
    assert {tuple(order) for order in _orders(_model("ordered", [1, 5, 9]), 50)} == {
        ("r0", "r1", "r2")
    }


@pytest.fixture
def weighted(catalog):
    catalog["models"][0]["routing"] = "weighted"
    catalog["models"][0]["routes"] = [
        {"provider": "fake", "upstream_model": "heavy", "weight": 3},
        {"provider": "fake", "upstream_model": "light", "weight": 1},
    ]
    catalog_load(data=catalog)
    return catalog


def test_requests_spread_over_weighted_routes(gateway_url, weighted, fake_provider):
    routing._draw.seed(7)
    _, key = make_key(make_org())
    client = sdk(gateway_url, key)

    for _ in range(24):
        client.chat.completions.create(model="fake-small", messages=MESSAGES)

    used = Counter(UsageRecord.objects.values_list("upstream_model", flat=True))
    assert used["heavy"] > used["light"] > 0
    assert used["heavy"] + used["light"] == 24


def test_a_failing_weighted_route_fails_over_to_the_other(gateway_url, weighted, fake_provider):
    routing._draw.seed(7)
    _, key = make_key(make_org())
    fake_provider.fail_next(500)

    sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    first, second = (call.json["model"] for call in fake_provider.calls)
    assert {first, second} == {"heavy", "light"}
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts) == (second, 2)


@pytest.fixture
def aliased(catalog):
    catalog["models"][0]["aliases"] = ["small", "fake-small-latest"]
    catalog["models"].append(
        {
            "name": "fake-large",
            "routes": [{"provider": "fake", "upstream_model": "fake-large-upstream"}],
            "price": {"input": "3", "output": "15"},
        }
    )
    catalog_load(data=catalog)
    return catalog


def test_an_alias_is_served_and_billed_as_its_model(gateway_url, aliased, fake_provider):
    _, key = make_key(make_org())

    completion = sdk(gateway_url, key).chat.completions.create(model="small", messages=MESSAGES)

    assert completion.model == "fake-small"
    assert fake_provider.calls[0].json["model"] == "fake-small-upstream"
    record = UsageRecord.objects.get()
    assert (record.model, record.upstream_model) == ("fake-small", "fake-small-upstream")


def test_models_lists_each_model_once_with_its_aliases(gateway_url, aliased):
    _, key = make_key(make_org())
    client = sdk(gateway_url, key)

    listed = client.models.list().data

    assert [model.id for model in listed] == ["fake-large", "fake-small"]
    assert listed[1].model_dump()["aliases"] == ["fake-small-latest", "small"]
    assert client.models.retrieve("small").id == "fake-small"


def test_a_key_restricted_to_a_model_may_use_its_aliases_and_nothing_else(
    gateway_url, aliased, fake_provider
):
    api_key, key = make_key(make_org())
    ApiKey.objects.filter(pk=api_key.pk).update(allowed_models=["fake-large"])
    client = sdk(gateway_url, key)

    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="small", messages=MESSAGES)
    assert [model.id for model in client.models.list().data] == ["fake-large"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("small")
    assert fake_provider.calls == []
