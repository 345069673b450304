"""POST /v1/embeddings end to end: the official openai SDK → Switchboard → the fake provider over
real HTTP, charged for its input tokens at the model's input price."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from billing.models import Reservation, UsageRecord
from billing.money import Price
from billing.selectors import wallet_balance_usd
from gateway.services import catalog_load
from tests.conftest import FAKE_PROVIDER_KEY_ENV
from tests.factories import make_key, make_org
from tests.fakes.provider import embedding_for
from tests.gateway.metering import assert_charged_exactly, sdk

# Embedding models have an input price only.
PRICE = Price(input_per_mtok_usd=Decimal("0.13"), output_per_mtok_usd=Decimal("0"))


@pytest.fixture
def embedding_catalog(catalog, fake_provider):
    catalog["models"].append(
        {
            "name": "text-embedding",
            "routes": [{"provider": "fake", "upstream_model": "fake-embedding"}],
            "price": {"input": "0.13", "output": "0"},
        }
    )
    catalog_load(data=catalog)
    return catalog


def test_it_embeds_and_charges_the_input_tokens(gateway_url, embedding_catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    raw = sdk(gateway_url, key).embeddings.with_raw_response.create(
        model="text-embedding", input=["one two three", "four"], encoding_format="float"
    )
    result = raw.parse()

    assert [d.embedding for d in result.data] == [
        embedding_for("one two three"),
        embedding_for("four"),
    ]
    assert result.model == "text-embedding"
    assert result.usage.prompt_tokens == 4
    [call] = fake_provider.calls
    assert (call.path, call.json["model"]) == ("/v1/embeddings", "fake-embedding")
    assert_charged_exactly(
        raw,
        org,
        price=PRICE,
        input_tokens=4,
        output_tokens=0,
        provider="fake",
        upstream_model="fake-embedding",
    )
    assert Reservation.objects.get().state == Reservation.State.SETTLED


def test_dimensions_and_base64_pass_through(gateway_url, embedding_catalog, fake_provider):
    _, key = make_key(make_org())

    # The SDK asks for base64 by default and decodes the float32 bytes itself.
    result = sdk(gateway_url, key).embeddings.create(
        model="text-embedding", input="one two", dimensions=3
    )

    [call] = fake_provider.calls
    assert (call.json["encoding_format"], call.json["dimensions"]) == ("base64", 3)
    assert result.data[0].embedding == pytest.approx(embedding_for("one two")[:3], abs=1e-6)


def test_raw_base64_reaches_the_client_untouched(gateway_url, embedding_catalog, fake_provider):
    _, key = make_key(make_org())

    response = httpx.post(
        f"{gateway_url}/embeddings",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "text-embedding", "input": [[5, 6, 7, 8]], "encoding_format": "base64"},
    )

    assert response.status_code == 200
    assert isinstance(response.json()["data"][0]["embedding"], str)
    assert response.json()["usage"]["prompt_tokens"] == 4
    assert UsageRecord.objects.get().input_tokens == 4
    assert response.headers["x-switchboard-cost-usd"]


def test_a_failing_route_fails_over(gateway_url, embedding_catalog, fake_provider):
    embedding_catalog["models"][-1]["routes"] = [
        {"provider": "fake", "upstream_model": "embed-1"},
        {"provider": "fake", "upstream_model": "embed-2"},
    ]
    catalog_load(data=embedding_catalog)
    _, key = make_key(make_org())
    fake_provider.fail_next(500)

    sdk(gateway_url, key).embeddings.create(model="text-embedding", input="hello")

    assert [c.json["model"] for c in fake_provider.calls] == ["embed-1", "embed-2"]
    record = UsageRecord.objects.get()
    assert (record.upstream_model, record.attempts, record.status) == ("embed-2", 2, "ok")


def test_a_model_without_an_embeddings_provider_gets_400(gateway_url, fake_provider):
    catalog_load(
        data={
            "providers": [
                {
                    "name": "gem",
                    "kind": "gemini",
                    "base_url": fake_provider.base_url,
                    "api_key_env": FAKE_PROVIDER_KEY_ENV,
                }
            ],
            "models": [
                {
                    "name": "gem-chat",
                    "routes": [{"provider": "gem", "upstream_model": "g"}],
                    "price": {"input": "1", "output": "1"},
                }
            ],
        }
    )
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    with pytest.raises(openai.BadRequestError):
        sdk(gateway_url, key).embeddings.create(model="gem-chat", input="hello")

    assert fake_provider.calls == []
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "text-embedding"}, "input"),
        ({"model": "text-embedding", "input": ""}, "input"),
        ({"model": "text-embedding", "input": [True]}, "input"),
        ({"model": "text-embedding", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "text-embedding", "input": "x", "dimensions": 0}, "dimensions"),
        ({"model": "text-embedding", "input": "x", "api_key": "sk-other"}, "api_key"),
        ({"model": "text-embedding", "input": "x", "o": [{"api_base": "h"}]}, "o[0].api_base"),
    ],
)
def test_a_bad_body_gets_400(gateway_url, embedding_catalog, fake_provider, body, param):
    _, key = make_key(make_org())

    response = httpx.post(
        f"{gateway_url}/embeddings", headers={"Authorization": f"Bearer {key}"}, json=body
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert response.headers["x-request-id"]
    assert fake_provider.calls == []


def test_a_key_limited_to_other_models_gets_403(gateway_url, embedding_catalog, fake_provider):
    key_row, key = make_key(make_org())
    key_row.allowed_models = ["fake-small"]
    key_row.save()

    with pytest.raises(openai.PermissionDeniedError):
        sdk(gateway_url, key).embeddings.create(model="text-embedding", input="hello")


def test_the_demo_provider_embeds_offline(gateway_url, fake_provider):
    catalog_load(
        data={
            "providers": [{"name": "demo", "kind": "demo"}],
            "models": [
                {
                    "name": "demo-embedding",
                    "routes": [{"provider": "demo", "upstream_model": "demo-embedding"}],
                    "price": {"input": "0.02", "output": "0"},
                }
            ],
        }
    )
    _, key = make_key(make_org())

    result = sdk(gateway_url, key).embeddings.create(
        model="demo-embedding", input=["a b", "c"], dimensions=4
    )

    assert [len(d.embedding) for d in result.data] == [4, 4]
    assert UsageRecord.objects.get().input_tokens == 3
