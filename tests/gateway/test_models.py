"""GET /v1/models and /v1/models/{id}: what the calling key may use, with exact prices."""

from __future__ import annotations

import httpx
import openai
import pytest

from gateway.services import catalog_load
from portal.models import ApiKey
from tests.factories import make_key, make_org
from tests.gateway.metering import sdk


@pytest.fixture
def two_models(catalog):
    catalog["models"][0]["context_length"] = 8192
    catalog["models"].append(
        {
            "name": "fake-large",
            "routes": [{"provider": "fake", "upstream_model": "fake-large-upstream"}],
            "price": {"input": "3", "output": "15", "cached_input": "0.30"},
            "max_output_tokens": 8000,
        }
    )
    catalog_load(data=catalog)
    return catalog


def test_it_lists_every_model_with_its_prices(gateway_url, two_models):
    _, key = make_key(make_org())

    listed = sdk(gateway_url, key).models.list()

    assert [model.id for model in listed.data] == ["fake-large", "fake-small"]
    large = listed.data[0].model_dump()
    assert large["owned_by"] == "switchboard"
    assert large["pricing"] == {
        "input_per_mtok_usd": "3.0000000000",
        "output_per_mtok_usd": "15.0000000000",
        "cached_input_per_mtok_usd": "0.3000000000",
        "cache_write_per_mtok_usd": "3.0000000000",
    }
    assert (large["max_output_tokens"], large["context_length"]) == (8000, None)
    assert listed.data[1].model_dump()["context_length"] == 8192


def test_a_restricted_key_sees_only_its_models(gateway_url, two_models):
    api_key, key = make_key(make_org())
    ApiKey.objects.filter(pk=api_key.pk).update(allowed_models=["fake-small"])
    client = sdk(gateway_url, key)

    assert [model.id for model in client.models.list().data] == ["fake-small"]
    assert client.models.retrieve("fake-small").id == "fake-small"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("fake-large")


def test_an_unknown_model_is_404_and_a_bad_key_401(gateway_url, two_models):
    _, key = make_key(make_org())

    with pytest.raises(openai.NotFoundError) as caught:
        sdk(gateway_url, key).models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway_url, "sb_not-a-key").models.list()


def test_posting_to_models_is_405(gateway_url, two_models):
    _, key = make_key(make_org())

    response = httpx.post(f"{gateway_url}/models", headers={"Authorization": f"Bearer {key}"})

    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "GET, HEAD"  # RFC 9110: a 405 says what is allowed


@pytest.mark.parametrize("path", ["/models", "/models/fake-small", "/models/no-such-model"])
def test_head_answers_as_get_does_without_the_body(gateway_url, two_models, path):
    # RFC 9110: HEAD on a GET resource gets GET's status and headers, Content-Length included.
    _, key = make_key(make_org())
    headers = {"Authorization": f"Bearer {key}"}

    got = httpx.get(f"{gateway_url}{path}", headers=headers)
    head = httpx.head(f"{gateway_url}{path}", headers=headers)

    assert head.status_code == got.status_code
    assert head.content == b""
    assert head.headers["content-length"] == str(len(got.content)) != "0"
    assert head.headers["content-type"] == got.headers["content-type"] == "application/json"
    assert head.headers["x-request-id"].startswith("req_")


def test_head_with_a_bad_key_is_401_without_a_body(gateway_url, two_models):
    response = httpx.head(f"{gateway_url}/models", headers={"Authorization": "Bearer sb_nope"})

    assert response.status_code == 401
    assert response.content == b""
    assert int(response.headers["content-length"]) > 0


@pytest.mark.parametrize("path", ["/chat/completions", "/messages", "/embeddings"])
def test_head_elsewhere_is_405_naming_the_method(gateway_url, path):
    response = httpx.head(f"{gateway_url}{path}")

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.content == b""
