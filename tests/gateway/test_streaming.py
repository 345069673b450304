"""POST /v1/chat/completions with `"stream": true`, end to end: the official openai SDK (or raw
httpx, to hang up midway) → Switchboard served by uvicorn → the fake provider streaming over
real HTTP, with each ending of a stream (finished, no usage chunk, cut, client gone) settled."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from decimal import Decimal

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from billing.models import Account, Reservation, UsageRecord
from billing.money import Price, usage_cost_usd
from billing.selectors import wallet_balance_usd
from gateway.providers.base import estimate_tokens
from gateway.services import catalog_load
from tests.conftest import FAKE_PROVIDER_KEY_ENV
from tests.factories import make_key, make_org
from tests.fakes.provider import (
    MISTRAL_REASONING_PARTS,
    FakeProvider,
    count_prompt_tokens,
    reply_for,
)

PRICE = Price(input_per_mtok_usd=Decimal("0.50"), output_per_mtok_usd=Decimal("1.50"))
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the switchboard operator please"},
]
REPLY = reply_for(MESSAGES, None)
# What the gateway charges when the provider reports no usage: the prompt estimated from the
# request's messages, the completion from the text relayed (at least one token a chunk).
ESTIMATED_PROMPT_TOKENS = estimate_tokens(json.dumps(MESSAGES))


def estimated_completion_tokens(text: str, chunks: int) -> int:
    return max(estimate_tokens(text), chunks)


def sdk(gateway_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0)


def wait_for(condition: Callable[[], bool], *, timeout: float = 10.0, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_it_streams_the_reply_and_charges_the_reported_usage(gateway_url, catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model="fake-small",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert {c.model for c in chunks} == {"fake-small"}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    prompt_tokens, completion_tokens = count_prompt_tokens(MESSAGES), len(REPLY.split())
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, completion_tokens)
    expected_cost = usage_cost_usd(
        price=PRICE, input_tokens=prompt_tokens, output_tokens=completion_tokens
    )
    record = UsageRecord.objects.get()
    assert (record.input_tokens, record.output_tokens) == (prompt_tokens, completion_tokens)
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert record.status == UsageRecord.Status.OK
    assert record.attempts == 1
    assert record.time_to_first_token_ms is not None
    assert record.time_to_first_token_ms <= record.latency_ms
    # A stream cannot carry its charge as a header: the usage chunk carries it.
    assert usage.model_extra is not None
    assert Decimal(usage.model_extra["cost_usd"]) == record.cost_usd
    assert record.cost_usd == expected_cost > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - expected_cost
    assert Reservation.objects.get().state == Reservation.State.SETTLED


def test_it_always_asks_the_upstream_for_usage_but_passes_it_on_only_when_asked(
    gateway_url, catalog, fake_provider
):
    _, key = make_key(make_org())

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model="fake-small", messages=MESSAGES, stream=True
        )
    )

    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == REPLY
    [call] = fake_provider.calls
    assert call.json["stream"] is True
    assert call.json["stream_options"] == {"include_usage": True}
    assert call.json["model"] == "fake-small-upstream"
    record = UsageRecord.objects.get()
    assert record.usage_source == UsageRecord.UsageSource.REPORTED
    assert record.output_tokens == len(REPLY.split())


def test_the_raw_stream_is_server_sent_events_ending_with_done(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org())

    with httpx.stream(
        "POST",
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": MESSAGES, "stream": True},
    ) as response:
        lines = [line for line in response.iter_lines() if line]

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"] == UsageRecord.objects.get().request_id
    events, comments = lines[:-2], lines[-2:-1]
    assert all(line.startswith("data: ") for line in events)
    assert comments == [f": cost_usd={UsageRecord.objects.get().cost_usd}"]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["model"] == "fake-small" for line in events)


def raw_stream_lines(gateway_url: str, key: str, **fields: object) -> list[str]:
    """The non-blank lines of a raw streamed chat completion."""
    with httpx.stream(
        "POST",
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": MESSAGES, "stream": True, **fields},
    ) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line]


def test_a_stream_ends_with_its_settled_cost_as_a_comment(gateway_url, catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)

    lines = raw_stream_lines(gateway_url, key)

    record = UsageRecord.objects.get()
    assert record.cost_usd > 0
    assert lines[-2:] == [f": cost_usd={record.cost_usd}", "data: [DONE]"]
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd


def test_a_stream_cut_midway_still_ends_with_its_settled_cost(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org(credit_usd="10"))
    fake_provider.cut_stream_after(2)

    lines = raw_stream_lines(gateway_url, key)

    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert lines[-2] == f": cost_usd={record.cost_usd}"
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "upstream_stream_failed"


def test_the_usage_chunk_and_the_comment_carry_the_same_cost(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org(credit_usd="10"))

    lines = raw_stream_lines(gateway_url, key, stream_options={"include_usage": True})

    usage = json.loads(lines[-3].removeprefix("data: "))["usage"]
    assert lines[-2] == f": cost_usd={usage['cost_usd']}"
    assert Decimal(usage["cost_usd"]) == UsageRecord.objects.get().cost_usd


def test_a_stream_without_a_usage_chunk_is_charged_an_estimate(gateway_url, catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.omit_usage_next()

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model="fake-small",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert all(c.usage is None for c in chunks)
    record = UsageRecord.objects.get()
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.status == UsageRecord.Status.OK
    assert record.attempts == 1
    output_tokens = estimated_completion_tokens(REPLY, len(REPLY.split()))
    assert (record.input_tokens, record.output_tokens) == (ESTIMATED_PROMPT_TOKENS, output_tokens)
    expected_cost = usage_cost_usd(
        price=PRICE, input_tokens=ESTIMATED_PROMPT_TOKENS, output_tokens=output_tokens
    )
    assert record.cost_usd == expected_cost > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - expected_cost


def test_a_stream_cut_midway_ends_with_an_error_event_and_is_charged_what_was_relayed(
    gateway_url, catalog, fake_provider
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.cut_stream_after(3)
    received: list[str] = []

    stream = sdk(gateway_url, key).chat.completions.create(
        model="fake-small", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    text = "".join(received)
    assert text == " ".join(REPLY.split()[:3])
    assert caught.value.code == "upstream_stream_failed"
    assert caught.value.type == "upstream_error"
    assert fake_provider.base_url not in caught.value.message
    assert "Traceback" not in caught.value.message
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.attempts == 1
    assert len(fake_provider.calls) == 1
    output_tokens = estimated_completion_tokens(text, 3)
    assert (record.input_tokens, record.output_tokens) == (ESTIMATED_PROMPT_TOKENS, output_tokens)
    assert record.cost_usd == usage_cost_usd(
        price=PRICE, input_tokens=ESTIMATED_PROMPT_TOKENS, output_tokens=output_tokens
    )
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd
    assert Reservation.objects.get().state == Reservation.State.SETTLED


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param(b"{not json", id="not_json"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="too_deep"),
        pytest.param({"object": "chat.completion.chunk", "choices": 5}, id="choices_a_number"),
        pytest.param({"object": "chat.completion.chunk", "choices": ["?"]}, id="choice_a_string"),
        pytest.param({"choices": [{"index": 0, "delta": "?"}]}, id="delta_a_string"),
        *[
            pytest.param({"choices": [{"index": 0, "delta": delta}]}, id=name)
            for name, delta in [
                ("content_a_number", {"content": 5}),
                ("content_a_list", {"content": ["hi"]}),
                ("tool_calls_an_object", {"tool_calls": {"index": 0}}),
                ("tool_call_a_string", {"tool_calls": ["?"]}),
                ("function_a_string", {"tool_calls": [{"index": 0, "function": "f"}]}),
                ("name_a_number", {"tool_calls": [{"index": 0, "function": {"name": 5}}]}),
                ("arguments_a_list", {"tool_calls": [{"index": 0, "function": {"arguments": []}}]}),
                ("index_a_word", {"tool_calls": [{"index": "0", "function": {"name": "f"}}]}),
            ]
        ],
        pytest.param(
            {"choices": [{"index": 0, "delta": {}, "finish_reason": 5}]}, id="finish_a_number"
        ),
    ],
)
def test_an_unreadable_chunk_ends_with_an_error_event_and_is_charged_what_was_relayed(
    gateway_url, catalog, fake_provider, chunk
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.send_chunk_next(chunk)
    received: list[str] = []

    stream = sdk(gateway_url, key).chat.completions.create(
        model="fake-small", messages=MESSAGES, stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        for piece in stream:
            received.append(piece.choices[0].delta.content or "")

    assert "".join(received) == REPLY.split()[0]
    assert caught.value.code == "upstream_stream_failed"
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd
    assert Reservation.objects.get().state == Reservation.State.SETTLED


@pytest.mark.parametrize(
    "delta",
    [
        pytest.param({"content": None, "refusal": " No."}, id="refusal"),
        pytest.param({"content": None, "tool_calls": None}, id="nulls"),
        pytest.param(
            {
                "content": None,
                "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}},
                    {"index": 0, "id": None, "function": {"name": None, "arguments": '{"a'}},
                    {"index": 1, "function": None},
                    {"function": {"arguments": "}"}},  # no index: some providers leave it out
                    {"index": 2, "type": "custom", "custom": {"name": "grep", "input": "x"}},
                ],
            },
            id="tool_call_pieces",
        ),
        pytest.param({"content": " ok", "reasoning_content": "hmm", "x_vendor": [1]}, id="extra"),
        pytest.param({"content": MISTRAL_REASONING_PARTS}, id="mistral_reasoning_parts"),
    ],
)
def test_an_unusual_chunk_of_the_apis_shape_is_relayed(gateway_url, catalog, fake_provider, delta):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    choice = {"index": 0, "delta": delta, "logprobs": {"content": []}, "finish_reason": None}
    fake_provider.send_chunk_next({"object": "chat.completion.chunk", "choices": [choice]})

    stream = sdk(gateway_url, key).chat.completions.create(
        model="fake-small", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)

    assert any(chunk.choices and chunk.choices[0].delta.to_dict() == delta for chunk in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    record = UsageRecord.objects.get()
    assert (record.status, record.usage_source) == ("ok", UsageRecord.UsageSource.REPORTED)
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10") - record.cost_usd


def _open_connections(provider: FakeProvider) -> int:
    """Connections the fake provider's server holds open, as its uvicorn counts them (a
    connection leaves the count when its peer closes it)."""
    server = provider._server
    assert server is not None
    return len(server._server.server_state.connections)


@pytest.fixture(scope="module")
def _slow_provider_server() -> Iterator[FakeProvider]:
    # Stopped with the module, not the test: the abandoned stream is still being generated
    # (the fake does not notice the hang-up) when the test ends.
    provider = FakeProvider(chunk_interval=0.5).start()
    yield provider
    provider.stop()


@pytest.fixture
def slow_provider(_slow_provider_server: FakeProvider, fake_provider: FakeProvider) -> FakeProvider:
    """A fake provider of this module's own, streaming a chunk every 0.5 s, behind `fake-slow`.

    Its own server, so that no connection pooled by other tests leads to it: every
    connection it holds is this test's stream.
    """
    provider = _slow_provider_server
    provider.reset()
    catalog_load(
        data={
            "providers": [
                {
                    "name": "slow",
                    "kind": "openai",
                    "base_url": provider.base_url,
                    "api_key_env": FAKE_PROVIDER_KEY_ENV,
                }
            ],
            "models": [
                {
                    "name": "fake-slow",
                    "routes": [{"provider": "slow", "upstream_model": "fake-slow-upstream"}],
                    "price": {"input": "0.50", "output": "1.50"},
                }
            ],
        }
    )
    return provider


def test_a_client_that_hangs_up_midway_is_charged_what_was_generated_and_the_upstream_is_closed(
    gateway_url, slow_provider
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    data_lines: list[str] = []

    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST",
            f"{gateway_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "fake-slow", "messages": MESSAGES, "stream": True},
        ) as response,
    ):
        assert response.status_code == 200
        # Kept referenced until the hang-up (leaving this block): httpx closes the connection
        # when this iterator is collected, which the garbage collector did at random moments,
        # now and then before the check below (the stream was then cancelled already).
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                data_lines.append(line)
            if len(data_lines) == 3:
                break
        assert _open_connections(slow_provider) == 1

    wait_for(
        lambda: (
            UsageRecord.objects.exists()
            and not Reservation.objects.filter(state=Reservation.State.HELD).exists()
        ),
        what="the abandoned stream to be settled",
    )
    # Well before the provider would have finished the stream (12 chunks, 0.5 s apart).
    wait_for(
        lambda: _open_connections(slow_provider) == 0,
        timeout=2.0,
        what="the upstream request to be closed",
    )
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.attempts == 1
    # The first chunk came 0.5 s before the client hung up; the stream ended after that.
    assert record.time_to_first_token_ms is not None
    assert record.time_to_first_token_ms < record.latency_ms
    words = len(REPLY.split())
    # At least what the client read, and less than the whole reply: generation was cut off.
    assert estimated_completion_tokens(REPLY, words) > record.output_tokens >= 3
    assert record.cost_usd > 0
    wallet = Account.objects.get(organization=org, kind=Account.Kind.WALLET)
    assert wallet.reserved_usd == 0
    assert wallet.balance_usd == Decimal("10") - record.cost_usd


def test_an_upstream_failure_before_the_first_byte_gets_502_json(
    gateway_url, catalog, fake_provider
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.fail_next(500, body={"error": {"message": "secret upstream detail"}})

    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gateway_url, key).chat.completions.create(
            model="fake-small", messages=MESSAGES, stream=True
        )

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_failed"
    assert caught.value.response.headers["content-type"] == "application/json"
    assert "secret upstream detail" not in caught.value.response.text
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")
    record = UsageRecord.objects.get()
    assert (record.status, record.cost_usd) == (UsageRecord.Status.UPSTREAM_ERROR, 0)
    assert (record.attempts, record.time_to_first_token_ms) == (1, None)
    assert Decimal(caught.value.response.headers["x-switchboard-cost-usd"]) == 0
    assert Reservation.objects.get().state == Reservation.State.VOIDED


def test_an_upstream_refusal_before_the_first_byte_gets_400_and_releases_the_hold(
    gateway_url, catalog, fake_provider
):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake_provider.fail_next(400, body={"error": {"message": "bad temperature"}})

    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway_url, key).chat.completions.create(
            model="fake-small", messages=MESSAGES, stream=True
        )

    assert "bad temperature" in caught.value.message
    assert not UsageRecord.objects.exists()
    assert Reservation.objects.get().state == Reservation.State.VOIDED
    assert wallet_balance_usd(organization_id=org.pk) == Decimal("10")


def test_the_demo_provider_streams(gateway_url, fake_provider):
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

    chunks = list(
        sdk(gateway_url, key).chat.completions.create(
            model="demo-echo", messages=MESSAGES, stream=True
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Demo reply to: Say hello to the switchboard operator please"
    assert UsageRecord.objects.get().usage_source == UsageRecord.UsageSource.REPORTED


def test_a_stream_of_one_organisation_charges_no_other(gateway_url, catalog, fake_provider):
    org_a, org_b = make_org(credit_usd="5"), make_org(credit_usd="7")
    _, key_a = make_key(org_a)

    list(
        sdk(gateway_url, key_a).chat.completions.create(
            model="fake-small", messages=MESSAGES, stream=True
        )
    )

    assert wallet_balance_usd(organization_id=org_a.pk) < Decimal("5")
    assert wallet_balance_usd(organization_id=org_b.pk) == Decimal("7")
    assert UsageRecord.objects.get().organization_id == org_a.pk


@pytest.mark.parametrize(("field", "value"), [("stream", "yes"), ("stream_options", [1])])
def test_bad_stream_fields_get_400(gateway_url, catalog, fake_provider, field, value):
    _, key = make_key(make_org())

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": MESSAGES, "stream": True, field: value},
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert fake_provider.calls == []
