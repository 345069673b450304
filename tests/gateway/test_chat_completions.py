"""POST /v1/chat/completions end to end: the official openai SDK → Switchboard served by
uvicorn → the fake provider over real HTTP, with the charge checked to the last unit."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from billing.models import Account, Posting, UsageRecord
from billing.money import Price, usage_cost_usd
from billing.selectors import wallet_balance_usd
from gateway import metrics
from gateway.selectors import forget_catalog
from gateway.services import catalog_load
from portal.services import api_key_revoke
from tests.conftest import FAKE_PROVIDER_SECRET
from tests.factories import make_key, make_org
from tests.fakes.provider import count_prompt_tokens, reply_for

PRICE = Price(input_per_mtok_usd=Decimal("0.50"), output_per_mtok_usd=Decimal("1.50"))
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the switchboard operator please"},
]


def sdk(gateway_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0)


def test_it_answers_and_charges_the_exact_price(gateway_url, catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    raw = sdk(gateway_url, key).chat.completions.with_raw_response.create(
        model="fake-small", messages=MESSAGES
    )
    completion = raw.parse()

    prompt_tokens = count_prompt_tokens(MESSAGES)
    reply = reply_for(MESSAGES, None)
    assert completion.choices[0].message.content == reply
    assert completion.model == "fake-small"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == len(reply.split())

    expected_cost = usage_cost_usd(
        price=PRICE, input_tokens=prompt_tokens, output_tokens=len(reply.split())
    )
    assert expected_cost > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - expected_cost
    record = UsageRecord.objects.get()
    assert record.request_id == raw.headers["x-request-id"]
    assert Decimal(raw.headers["x-switchboard-cost-usd"]) == expected_cost
    assert (record.input_tokens, record.output_tokens) == (prompt_tokens, len(reply.split()))
    assert record.cost_usd == expected_cost
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert (record.provider, record.upstream_model) == ("fake", "fake-small-upstream")
    assert record.status == UsageRecord.Status.OK
    assert record.organization_id == org.pk


def test_it_forwards_the_upstream_model_and_the_provider_secret(
    gateway_url, catalog, fake_provider
):
    _, key = make_key(make_org())

    sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES, user="u1")

    [call] = fake_provider.calls
    assert call.path == "/v1/chat/completions"
    assert call.json["model"] == "fake-small-upstream"
    assert call.json["user"] == "u1"
    assert call.headers["authorization"] == f"Bearer {FAKE_PROVIDER_SECRET}"
    assert key not in str(call.headers)  # the client's key never reaches the provider


def test_it_keeps_the_ledger_balanced(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org())

    for _ in range(3):
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    for account in Account.objects.all():
        postings = sum(p.amount_usd for p in Posting.objects.filter(account=account))
        assert account.balance_usd == postings
    assert sum(p.amount_usd for p in Posting.objects.all()) == 0


def test_a_key_spends_only_its_own_organisations_wallet(gateway_url, catalog, fake_provider):
    org_a, org_b = make_org(credit_usd="5"), make_org(credit_usd="7")
    _, key_a = make_key(org_a)

    sdk(gateway_url, key_a).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert wallet_balance_usd(organization_id=org_a.pk) < Decimal("5")
    assert wallet_balance_usd(organization_id=org_b.pk) == Decimal("7")
    assert UsageRecord.objects.get().organization_id == org_a.pk


def test_a_whole_answer_and_an_error_go_out_with_their_length_not_chunked(
    gateway_url, catalog, fake_provider
):
    _, key = make_key(make_org())
    answer = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": MESSAGES},
    )
    refusal = httpx.post(f"{gateway_url}/chat/completions", json={"model": "fake-small"})

    for response in (answer, refusal):
        assert response.headers["content-length"] == str(len(response.content))
        assert "transfer-encoding" not in response.headers
    assert answer.status_code == 200
    assert refusal.status_code == 401


def test_a_revoked_key_gets_401(gateway_url, catalog, fake_provider):
    api_key, key = make_key(make_org())
    api_key_revoke(api_key=api_key)

    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert fake_provider.calls == []


@pytest.mark.parametrize("key", ["", "sk-not-ours", "sb_" + "A" * 38])
def test_a_bad_key_gets_401(gateway_url, catalog, fake_provider, key):
    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"} if key else {},
        json={"model": "fake-small", "messages": MESSAGES},
    )

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert fake_provider.calls == []


def test_an_org_without_credit_gets_402_and_the_provider_is_not_called(
    gateway_url, catalog, fake_provider
):
    org = make_org(credit_usd=None)
    _, key = make_key(org)

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert caught.value.status_code == 402
    assert caught.value.code == "insufficient_credit"
    assert fake_provider.calls == []
    assert not UsageRecord.objects.exists()


@pytest.mark.parametrize(
    ("max_tokens", "max_completion_tokens"), [(100_000, 100_000), (100_000, 5), (5, 100_000)]
)
def test_both_completion_limits_are_sent_as_the_one_reserved(
    gateway_url, catalog, fake_provider, max_tokens, max_completion_tokens
):
    # Clients send both names for compatibility; a provider that reads only max_tokens
    # (llama.cpp, older servers) would otherwise generate past the limit the hold covers.
    _, key = make_key(make_org())

    sdk(gateway_url, key).chat.completions.create(
        model="fake-small",
        messages=MESSAGES,
        max_tokens=max_tokens,
        max_completion_tokens=max_completion_tokens,
    )

    sent = fake_provider.calls[0].json
    limit = min(max_completion_tokens, 4096)  # the newer name wins, capped at the model's cap
    assert (sent["max_tokens"], sent["max_completion_tokens"]) == (limit, limit)


@pytest.mark.parametrize("n", [2**62, 2**64 - 1])
def test_a_worst_case_no_wallet_could_hold_gets_402(gateway_url, catalog, fake_provider, n):
    # 4096 tokens x n choices at $75/M is more than a money column holds (and, for the
    # larger n, more digits than the decimal context's precision): it cannot be reserved.
    catalog_load(
        data={
            **catalog,
            "models": [
                {
                    "name": "fake-pricey",
                    "routes": [{"provider": "fake", "upstream_model": "fake-small-upstream"}],
                    "price": {"input": "15", "output": "75"},
                }
            ],
        }
    )
    _, key = make_key(make_org(credit_usd="10"))

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-pricey", "messages": MESSAGES, "n": n},
    )

    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credit"
    assert fake_provider.calls == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt_tokens", [-5, 10**30, 2**31])
def test_a_provider_usage_that_cannot_be_billed_is_charged_an_estimate(
    gateway_url, catalog, fake_provider, stream, prompt_tokens
):
    # A negative count, or one no usage record can hold, made the settlement fail after the
    # provider had answered: a 500 (a stream without its charge), no usage record, and the
    # hold left for the sweeper to void.
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.reported_usage = (prompt_tokens, 3)

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": MESSAGES, "stream": stream},
    )

    assert response.status_code == 200
    assert ("cost_usd=" in response.text) if stream else response.json()["choices"]
    record = UsageRecord.objects.get()
    assert (record.status, record.usage_source) == ("ok", "estimated")
    assert record.input_tokens > 0 and record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd


def test_tools_are_reserved_the_system_prompt_a_provider_adds_for_them(
    gateway_url, catalog, fake_provider
):
    # Anthropic bills up to 530 tokens of its own tool-use system prompt, more than a small
    # request's bytes: the hold has to cover them. This wallet holds a small request's bytes
    # and output, not a thousand tokens more.
    org = make_org(credit_usd="0.0003")
    _, key = make_key(org)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(
            model="fake-small",
            messages=MESSAGES,
            max_tokens=1,
            tools=[tool],  # type: ignore[list-item]
        )

    assert caught.value.status_code == 402
    assert fake_provider.calls == []
    sdk(gateway_url, key).chat.completions.create(
        model="fake-small", messages=MESSAGES, max_tokens=1
    )


@pytest.mark.parametrize(("image_tokens", "status"), [(None, 200), (48_169, 402)])
def test_each_image_is_reserved_what_the_models_provider_bills_for_one(
    gateway_url, catalog, fake_provider, image_tokens, status
):
    # gpt-4o-mini bills up to 48,169 tokens an image: a hold of the default 2,000 let a few
    # images overdraw a wallet. This wallet covers one image at 2,000 tokens, not at 48,169.
    if image_tokens is not None:
        catalog["models"][0]["image_tokens"] = image_tokens
        catalog_load(data=catalog)
        forget_catalog()
    _, key = make_key(make_org(credit_usd="0.01"))
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": "fake-small",
            "max_tokens": 1,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}],
        },
    )

    assert response.status_code == status
    assert len(fake_provider.calls) == (status == 200)


def test_an_unknown_model_gets_404(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org())

    with pytest.raises(openai.NotFoundError) as caught:
        sdk(gateway_url, key).chat.completions.create(model="no-such-model", messages=MESSAGES)

    assert caught.value.code == "model_not_found"
    assert fake_provider.calls == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        # Not JSON either (RFC 8259), though Python's json reads them: a lone surrogate
        # cannot be sent on as UTF-8 (it was a 500), NaN would reach the provider as is.
        (
            b'{"model": "fake-small", "messages": [{"role": "user", "content": "a \\ud800 b"}]}',
            "not valid JSON",
        ),
        (
            b'{"model": "fake-small", "messages": [{"role": "user", "content": "hi"}],'
            b' "temperature": NaN}',
            "not valid JSON",
        ),
        (
            b'{"model": "fake-small", "messages": [{"role": "user", "content": "hi"}],'
            b' "top_p": -Infinity}',
            "not valid JSON",
        ),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "'model' is required"),
        (b'{"model": "fake-small", "messages": []}', "'messages'"),
        (b'{"model": "fake-small", "messages": ["hi"]}', "'role'"),
        (
            b'{"model": "fake-small", "messages": [{"role": "user", "content": "hi"}],'
            b' "extra": {"api_base": "http://evil.example"}}',
            "extra.api_base",
        ),
        # Within orjson's depth limit, past Python's recursion limit: it was a 500.
        (
            b'{"model": "fake-small", "messages": [{"role": "user", "content": "hi"}],'
            b' "metadata": ' + b"[" * 1000 + b"]" * 1000 + b"}",
            "nested",
        ),
    ],
)
def test_a_bad_body_gets_400_in_openai_shape(gateway_url, catalog, fake_provider, body, fragment):
    _, key = make_key(make_org())

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=body,
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"].startswith("req_")
    assert fake_provider.calls == []


def test_a_body_after_a_utf8_byte_order_mark_is_read(gateway_url, catalog, fake_provider):
    # RFC 8259 lets a parser ignore the mark, and some clients (Windows PowerShell 5) send it.
    _, key = make_key(make_org(credit_usd="10"))

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=b"\xef\xbb\xbf"
        + b'{"model": "fake-small", "messages": [{"role": "user", "content": "hi"}]}',
    )

    assert response.status_code == 200, response.text
    assert len(fake_provider.calls) == 1


@pytest.mark.parametrize("upstream_status", [500, 503, 401, 403])
def test_an_upstream_failure_gets_502_and_is_recorded_uncharged(
    gateway_url, catalog, fake_provider, upstream_status
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.fail_next(
        upstream_status, body={"error": {"message": "secret upstream detail", "type": "x"}}
    )

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_failed"
    assert "secret upstream detail" not in caught.value.response.text
    assert fake_provider.base_url not in caught.value.response.text
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.UPSTREAM_ERROR
    assert record.cost_usd == 0


def test_an_unreachable_upstream_gets_502(gateway_url, catalog, fake_provider, monkeypatch):
    from gateway.models import Provider

    Provider.objects.filter(name="fake").update(base_url="http://127.0.0.1:9/v1")
    _, key = make_key(make_org())

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(model="fake-small", messages=MESSAGES)

    assert caught.value.status_code == 502
    assert "127.0.0.1:9" not in caught.value.response.text


def test_an_unknown_endpoint_answers_404_in_openai_shape(gateway_url):
    response = httpx.get(f"{gateway_url}/no/such/thing")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_endpoint"


def _failing_metric(*args, **kwargs):
    raise RuntimeError("a bug in a metric")


def test_a_metric_that_fails_after_the_settlement_leaves_the_answer_alone(
    gateway_url, catalog, fake_provider, monkeypatch
):
    # No metric fails on purpose: one that does stands in for a bug. It runs once the request
    # is settled; the caller, charged, must get the answer and the charge, not a 500 saying 0.
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    monkeypatch.setattr(metrics, "request_finished", _failing_metric)

    raw = sdk(gateway_url, key).chat.completions.with_raw_response.create(
        model="fake-small", messages=MESSAGES
    )

    record = UsageRecord.objects.get()
    assert raw.parse().choices[0].message.content
    assert Decimal(raw.headers["x-switchboard-cost-usd"]) == record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd
