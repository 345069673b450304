"""The gateway's JSON answers (gateway/wire.py): orjson's bytes where it can write them, json's
where it refuses, and what a provider answered relayed either way."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import httpx

from gateway.wire import json_bytes
from tests.factories import make_key, make_org


def test_it_writes_compact_utf8_json():
    assert json_bytes({"content": "héllo", "n": 1, "ok": True}) == (
        '{"content":"héllo","n":1,"ok":true}'.encode()
    )


def test_it_writes_decimals_and_datetimes_as_djangos_encoder_does():
    data = {"cost": Decimal("0.0001500000"), "at": datetime(2026, 1, 2, 3, 4, 5, 678901, UTC)}

    assert json.loads(json_bytes(data)) == {
        "cost": "0.0001500000",
        "at": "2026-01-02T03:04:05.678Z",
    }


def test_it_falls_back_to_json_for_what_orjson_refuses():
    # A lone surrogate (a provider's answer can hold one), an integer past 64 bits.
    assert json_bytes({"text": "a \ud800 b"}) == b'{"text": "a \\ud800 b"}'
    assert json_bytes({"n": 2**70}) == b'{"n": 1180591620717411303424}'


def test_it_writes_nan_as_null():
    assert json_bytes({"logprob": float("nan"), "top": float("-inf")}) == (
        b'{"logprob":null,"top":null}'
    )


def test_a_provider_answer_holding_a_lone_surrogate_is_relayed(gateway_url, catalog, fake_provider):
    # An answer cut mid-character upstream can carry a lone surrogate's escape; providers'
    # answers are read leniently, and the answer must go back to the client, not fail.
    _, key = make_key(make_org(credit_usd="10"))
    fake_provider.fail_next(
        200,
        body={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "upstream",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "half a \ud83d"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        },
    )

    reply = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": [{"role": "user", "content": "hi"}]},
    )

    assert reply.status_code == 200, reply.text
    assert b'"half a \\ud83d"' in reply.content
    assert reply.json()["usage"]["completion_tokens"] == 3
