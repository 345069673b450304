"""The fake provider, driven through the official openai SDK over real HTTP (no Django)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.fakes.provider import (
    EMBEDDING_DIMENSIONS,
    MODELS,
    FakeProvider,
    count_prompt_tokens,
    embedding_for,
    reply_for,
    text_reply_for,
)

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "please tell me about the weather today in Paris"},
]


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    """One fake provider for the whole module."""
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def fake(provider: FakeProvider) -> FakeProvider:
    """The module's provider with no calls recorded and nothing scripted."""
    provider.reset()
    return provider


@pytest.fixture
def client(fake: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key="x", max_retries=0)


def _stream(client: openai.OpenAI, *, include_usage: bool) -> list[ChatCompletionChunk]:
    stream = client.chat.completions.create(
        model="fake-small",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": include_usage},
    )
    return list(stream)


def test_the_token_helpers_are_deterministic() -> None:
    # 3 + 3 words, plus 3 per message; text parts count, image parts do not.
    assert count_prompt_tokens(MESSAGES) == 3 + 9 + 2 * 3
    parts = [{"type": "text", "text": "two words"}, {"type": "image_url", "image_url": {}}]
    assert count_prompt_tokens([{"role": "user", "content": parts}]) == 2 + 3
    assert reply_for(MESSAGES) == "Hello from the fake provider. You said: please tell me about the"
    assert reply_for(MESSAGES, 2) == "Hello from"


def test_a_completion_carries_the_deterministic_reply_and_usage(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    completion = client.chat.completions.create(model="fake-small", messages=MESSAGES)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "fake-small"
    [choice] = completion.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == reply_for(MESSAGES)
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    prompt_tokens = count_prompt_tokens(MESSAGES)
    completion_tokens = len(reply_for(MESSAGES).split())
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.completion_tokens == completion_tokens
    assert completion.usage.total_tokens == prompt_tokens + completion_tokens


@pytest.mark.parametrize("limit_name", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_cuts_the_reply_with_finish_reason_length(
    client: openai.OpenAI, limit_name: str
) -> None:
    if limit_name == "max_tokens":
        completion = client.chat.completions.create(
            model="fake-small", messages=MESSAGES, max_tokens=4
        )
    else:
        completion = client.chat.completions.create(
            model="fake-small", messages=MESSAGES, max_completion_tokens=4
        )

    assert completion.choices[0].message.content == reply_for(MESSAGES, 4) == "Hello from the fake"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4


def test_a_stream_yields_one_chunk_per_word_then_the_usage_chunk(client: openai.OpenAI) -> None:
    chunks = _stream(client, include_usage=True)

    words = reply_for(MESSAGES).split()
    content_chunks, finish_chunk, usage_chunk = chunks[:-2], chunks[-2], chunks[-1]
    assert len(content_chunks) == len(words)
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == reply_for(MESSAGES)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert all(c.usage is None for c in chunks[:-1])
    assert finish_chunk.choices[0].finish_reason == "stop"
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == count_prompt_tokens(MESSAGES)
    assert usage_chunk.usage.completion_tokens == len(words)
    assert usage_chunk.usage.total_tokens == count_prompt_tokens(MESSAGES) + len(words)


def test_a_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = _stream(client, include_usage=False)

    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_stream_is_on_the_wire_as_server_sent_events(fake: FakeProvider) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    response = httpx.post(
        f"{fake.base_url}/chat/completions", json=body, headers={"Authorization": "Bearer k"}
    )

    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: ") for event in events[:-1])


def test_chunks_are_flushed_as_they_are_produced() -> None:
    with FakeProvider(chunk_interval=0.1) as slow:
        client = openai.OpenAI(base_url=slow.base_url, api_key="x", max_retries=0)
        started = time.monotonic()
        stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        arrivals = [time.monotonic() - started for _ in stream]

    # 13 chunks 0.1 s apart: the first arrives long before the last is produced.
    assert arrivals[-1] >= 1.0
    assert arrivals[0] < arrivals[-1] - 0.8


def test_a_scripted_500_raises_internal_server_error_once(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    fake.fail_next(500)

    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="fake-small", messages=MESSAGES)

    assert caught.value.status_code == 500
    assert isinstance(caught.value.body, dict)
    assert set(caught.value.body) == {"message", "type", "param", "code"}
    assert caught.value.type == "server_error"
    # Consumed: the next request is answered normally.
    client.chat.completions.create(model="fake-small", messages=MESSAGES)


def test_a_scripted_429_shows_retry_after_on_the_error_response(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    fake.fail_next(429, headers={"Retry-After": "1"})

    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="fake-small", messages=MESSAGES)

    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.code == "rate_limit_exceeded"
    assert len(fake.calls) == 1  # max_retries=0: the SDK did not retry


def test_scripted_failures_repeat_and_can_carry_a_custom_body(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    fake.fail_next(503, body={"error": {"message": "overloaded", "type": "x"}}, times=2)

    for _ in range(2):
        with pytest.raises(openai.APIStatusError) as caught:
            client.models.list()
        assert caught.value.status_code == 503
        assert caught.value.body == {"message": "overloaded", "type": "x"}
    assert [m.id for m in client.models.list()] == list(MODELS)


@pytest.mark.parametrize(
    ("body", "sent"),
    [({"choices": 5}, b'{"choices": 5}'), (b"[" * 5000 + b"]" * 5000, b"[" * 5000 + b"]" * 5000)],
)
def test_answer_next_sends_the_body_once_bytes_as_they_are(
    fake: FakeProvider, body: object, sent: bytes
) -> None:
    fake.answer_next(body)

    scripted = httpx.post(f"{fake.base_url}/chat/completions", json={})
    normal = httpx.get(f"{fake.base_url}/models", headers={"Authorization": "Bearer k"})

    assert (scripted.status_code, scripted.content) == (200, sent)
    assert [m["id"] for m in normal.json()["data"]] == list(MODELS)


def test_delay_next_holds_the_first_byte(fake: FakeProvider, client: openai.OpenAI) -> None:
    fake.delay_next(0.3)

    started = time.monotonic()
    client.models.list()
    delayed = time.monotonic() - started
    started = time.monotonic()
    client.models.list()
    undelayed = time.monotonic() - started

    assert delayed >= 0.3
    assert undelayed < 0.3


def test_a_cut_stream_yields_its_chunks_then_raises_a_connection_error(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    fake.cut_stream_after(2)
    received: list[ChatCompletionChunk] = []

    # What the SDK really does when the peer drops a chunked response: the chunks already
    # parsed come through, then the HTTP client's RemoteProtocolError ("incomplete chunked
    # read") surfaces as APIConnectionError.
    with pytest.raises(openai.APIConnectionError) as caught:
        for chunk in client.chat.completions.create(
            model="fake-small",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        ):
            received.append(chunk)

    assert type(caught.value.__cause__).__name__ == "RemoteProtocolError"
    assert [c.choices[0].delta.content for c in received] == ["Hello", " from"]
    assert all(c.usage is None for c in received)
    # The fault was consumed; the provider still serves complete streams.
    assert _stream(client, include_usage=True)[-1].usage is not None


def test_omit_usage_next_ends_the_stream_without_usage(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    fake.omit_usage_next()

    chunks = _stream(client, include_usage=True)

    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply_for(MESSAGES)


def test_calls_are_recorded_and_reset_forgets_them(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    client.chat.completions.create(model="fake-small", messages=MESSAGES, user="u1")
    client.models.list()

    chat, models = fake.calls
    assert (chat.method, chat.path) == ("POST", "/v1/chat/completions")
    assert chat.headers["authorization"] == "Bearer x"
    assert chat.headers["content-type"] == "application/json"
    assert chat.json == {"model": "fake-small", "messages": MESSAGES, "user": "u1"}
    assert (models.method, models.path, models.json) == ("GET", "/v1/models", None)

    fake.fail_next(500)
    fake.reset()
    assert fake.calls == []
    client.models.list()  # the scripted failure was forgotten too


def test_embeddings_are_deterministic(client: openai.OpenAI) -> None:
    result = client.embeddings.create(
        model="fake-embedding", input=["one two", "three"], encoding_format="float"
    )

    assert result.object == "list"
    assert result.model == "fake-embedding"
    assert [d.index for d in result.data] == [0, 1]
    assert [d.embedding for d in result.data] == [embedding_for("one two"), embedding_for("three")]
    assert all(len(d.embedding) == EMBEDDING_DIMENSIONS for d in result.data)
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (3, 3)
    single = client.embeddings.create(
        model="fake-embedding", input="one two", encoding_format="float"
    )
    assert single.data[0].embedding == embedding_for("one two")


def test_embeddings_come_as_base64_float32_and_cut_to_dimensions(
    fake: FakeProvider, client: openai.OpenAI
) -> None:
    # The SDK asks for base64 by default and decodes it back to floats.
    result = client.embeddings.create(model="fake-embedding", input=[[1, 2, 3]], dimensions=4)

    assert fake.calls[-1].json["encoding_format"] == "base64"
    assert result.data[0].embedding == pytest.approx(embedding_for("1 2 3")[:4], abs=1e-6)
    assert result.usage.prompt_tokens == 3


def test_a_legacy_completion_streamed_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="fake-small", prompt="say one two", max_tokens=9)
    chunks = list(
        client.completions.create(
            model="fake-small",
            prompt="say one two",
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert whole.choices[0].text == text_reply_for("say one two", 9)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.usage is not None and chunks[-1].usage == whole.usage
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (3, 9)


def test_the_models_list(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == list(MODELS)


@pytest.mark.parametrize(
    ("headers", "content", "path", "status"),
    [
        ({}, b'{"model": "m", "messages": []}', "/chat/completions", 401),
        ({"Authorization": "Bearer"}, b"{}", "/chat/completions", 401),
        ({"Authorization": "Basic abc"}, b"{}", "/chat/completions", 401),
        ({"Authorization": "Bearer k"}, b"{not json", "/chat/completions", 400),
        ({"Authorization": "Bearer k"}, b'{"model": "m"}', "/chat/completions", 400),
        ({"Authorization": "Bearer k"}, b"{}", "/completions/nope", 404),
    ],
)
def test_bad_requests_get_openai_error_bodies(
    fake: FakeProvider, headers: dict[str, str], content: bytes, path: str, status: int
) -> None:
    response = httpx.post(f"{fake.base_url}{path}", content=content, headers=headers)

    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert len(fake.calls) == 1


def test_base_url_needs_a_running_provider() -> None:
    stopped = FakeProvider()
    with pytest.raises(RuntimeError):
        _ = stopped.base_url
    with stopped:
        assert stopped.base_url.startswith("http://127.0.0.1:")
        assert stopped.base_url.endswith("/v1")
    stopped.stop()  # stopping twice is harmless
