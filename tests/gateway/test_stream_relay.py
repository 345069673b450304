"""The relay's chunks as OpenAI's server-sent events (gateway/streaming.py): a chunk it leaves
as it came goes out as the provider's own bytes, one it changes is written anew."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from gateway.providers.base import TokenUsage, UpstreamStream
from gateway.providers.sse import EventObject
from gateway.streaming import openai_events, relay_chat_stream

# As a provider writes them: compact, unlike json.dumps' default, so re-encoding shows.
AS_IS = b'{"id":"c","model":"catalog-name","choices":[{"index":0,"delta":{"content":"Hi"}}]}'
OTHER_MODEL = b'{"id":"c","model":"dated-name","choices":[{"index":0,"delta":{"content":"a"}}]}'
NULL_USAGE = (
    b'{"id":"c","model":"catalog-name","choices":[{"index":0,"delta":{"content":"b"}}],'
    b'"usage":null}'
)
USAGE = b'{"id":"c","model":"catalog-name","choices":[],"usage":{"prompt_tokens":3}}'
# Mistral, Ollama and others report the usage on the last content chunk, not on one of its own.
LAST_WITH_USAGE = (
    b'{"id":"c","model":"catalog-name","choices":[{"index":0,"delta":{"content":"c"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":1000,"completion_tokens":500}}'
)


def relayed(
    upstream_events: list[bytes], *, pass_usage: bool, settled: list[TokenUsage] | None = None
) -> list[bytes]:
    """The client's events for an upstream that sent `upstream_events`, settled at $0.01 (the
    usage settled is appended to `settled`)."""

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        for raw in upstream_events:
            yield EventObject(json.loads(raw), raw)

    async def close() -> None:
        pass

    async def checkpoint(usage: TokenUsage) -> None:
        pass

    async def finish(usage: TokenUsage, completed: bool) -> None:
        if settled is not None:
            settled.append(usage)

    async def scenario() -> list[bytes]:
        events = relay_chat_stream(
            upstream=UpstreamStream(chunks=chunks(), close=close),
            model_name="catalog-name",
            prompt_tokens=3,
            pass_usage=pass_usage,
            checkpoint=checkpoint,
            finish=finish,
            settled_cost=lambda: "0.01",
        )
        return [sse async for sse in openai_events(events)]

    return asyncio.run(scenario())


def test_a_chunk_left_as_it_came_goes_out_as_the_providers_bytes() -> None:
    [first, _] = relayed([AS_IS], pass_usage=False)

    assert first == b"data: " + AS_IS + b"\n\n"


def test_a_chunk_whose_model_is_renamed_is_written_anew() -> None:
    [first, _] = relayed([OTHER_MODEL], pass_usage=False)

    expected = {**json.loads(OTHER_MODEL), "model": "catalog-name"}
    assert first == f"data: {json.dumps(expected)}\n\n".encode()


def test_a_chunks_null_usage_the_client_did_not_ask_for_is_dropped() -> None:
    [first, _] = relayed([NULL_USAGE], pass_usage=False)

    expected = json.loads(NULL_USAGE)
    del expected["usage"]
    assert first == f"data: {json.dumps(expected)}\n\n".encode()


def test_the_usage_chunk_carries_the_charge_and_leaves_with_the_last_event() -> None:
    [first, last] = relayed([AS_IS, USAGE], pass_usage=True)

    usage_chunk = {**json.loads(USAGE), "usage": {"prompt_tokens": 3, "cost_usd": "0.01"}}
    assert first == b"data: " + AS_IS + b"\n\n"
    assert last == (
        f"data: {json.dumps(usage_chunk)}\n\n".encode()
        + b": cost_usd=0.01\n\n"
        + b"data: [DONE]\n\n"
    )


def test_usage_on_the_last_content_chunk_is_charged_and_not_passed_unasked() -> None:
    settled: list[TokenUsage] = []

    [_, last, end] = relayed([AS_IS, LAST_WITH_USAGE], pass_usage=False, settled=settled)

    assert settled == [TokenUsage(input_tokens=1000, output_tokens=500)]  # reported, not guessed
    expected = json.loads(LAST_WITH_USAGE)
    del expected["usage"]
    assert last == f"data: {json.dumps(expected)}\n\n".encode()
    assert end == b": cost_usd=0.01\n\ndata: [DONE]\n\n"


def test_usage_on_the_last_content_chunk_reaches_the_client_as_openais_usage_chunk() -> None:
    settled: list[TokenUsage] = []

    [_, last, end] = relayed([AS_IS, LAST_WITH_USAGE], pass_usage=True, settled=settled)

    assert settled == [TokenUsage(input_tokens=1000, output_tokens=500)]
    content = json.loads(last.removeprefix(b"data: "))
    assert content["choices"][0]["finish_reason"] == "stop" and "usage" not in content
    usage_chunk = json.loads(end.split(b"\n\n")[0].removeprefix(b"data: "))
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 1000,
        "completion_tokens": 500,
        "cost_usd": "0.01",
    }
