"""What the tests of POST /v1/chat/completions against a provider whose API the gateway translates
to (Anthropic's Messages API, Gemini's generateContent) share: the request they send, each
provider's description (its fake, its catalog entry, and the parts of its wire format a test
checks), and fixtures that serve the fake.

tests/gateway/test_translated_upstreams.py runs every scenario both providers have once per
provider; test_anthropic_upstream.py and test_gemini_upstream.py hold what only one has."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Generic, TypeVar

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from billing.models import Reservation, UsageRecord
from billing.money import Price
from billing.selectors import wallet_balance_usd
from gateway.services import catalog_load
from tests.factories import make_key, make_org
from tests.fakes import anthropic as fake_anthropic
from tests.fakes import gemini as fake_gemini
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.gemini import FakeGemini
from tests.fakes.provider import RecordedCall
from tests.gateway.metering import assert_charged_exactly, sdk

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the switchboard operator please"},
]
#: The fakes call it for a question about the weather when it is offered.
WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


# --- the providers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportedUsage:
    """The usage a fake reported with an answer, in the gateway's terms: every prompt token
    (cached ones included), every output token (thinking included), and how many of the prompt's
    were read from and written to the provider's prompt cache."""

    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0


_TranslatingFake = TypeVar("_TranslatingFake", FakeAnthropic, FakeGemini)


class TranslatedUpstream(ABC, Generic[_TranslatingFake]):
    """A provider whose API the gateway translates /v1/chat/completions to, as its tests see it:
    the attributes name its fake and catalog entry, the methods speak its wire format."""

    name: str  # in test ids, and, capitalised, in the fake's greeting
    kind: str  # the catalog's provider kind
    provider: str  # the catalog's provider name
    key_env: str
    secret: str  # the provider key the fake accepts
    wrong_key: str  # a key of the provider's shape that the fake refuses
    # Words of the provider's answer to `wrong_key` that must not reach the client.
    wrong_key_detail: str
    model: str
    upstream_model: str
    catalog_price: dict[str, str]
    price: Price  # the same prices, as the gateway bills them
    reply_prefix: str  # how the fake's answers begin
    tool_reply_prefix: str  # how its answers to tool results begin
    # The status the provider answers when it is overloaded.
    overloaded_status: int
    key_header: str  # the request header that carries the provider key
    # The other request headers the provider needs.
    request_headers: dict[str, str]
    # How the gateway's tool call ids begin for this provider's calls.
    tool_call_id_prefix: str
    # The tool-call deltas a streamed call of get_weather arrives in.
    tool_call_deltas: int
    # What a test of the translated request sends besides the model, MESSAGES and
    # max_tokens=50: the fields whose translation it checks.
    sampling_fields: dict[str, Any]

    @abstractmethod
    def new_fake(self) -> _TranslatingFake:
        """A stopped fake that accepts `secret` only."""

    def catalog(self, fake: _TranslatingFake, *upstream_models: str) -> dict[str, Any]:
        """A catalog with the provider and `model`, routed to `fake` once per upstream model, in
        order (several: failover between deployments of one provider)."""
        return {
            "providers": [
                {
                    "name": self.provider,
                    "kind": self.kind,
                    "base_url": fake.base_url,
                    "api_key_env": self.key_env,
                }
            ],
            "models": [
                {
                    "name": self.model,
                    "routes": [
                        {"provider": self.provider, "upstream_model": upstream}
                        for upstream in upstream_models
                    ],
                    "price": self.catalog_price,
                }
            ],
        }

    @abstractmethod
    def count_prompt_tokens(self, request: dict[str, Any]) -> int:
        """The prompt tokens the fake counts in a request in the provider's format."""

    @abstractmethod
    def reported(self, reply: dict[str, Any]) -> ReportedUsage:
        """The usage the fake reported with `reply`."""

    @abstractmethod
    def reply_text(self, reply: dict[str, Any]) -> str:
        """The text of the fake's (non-streamed form of its) answer."""

    @abstractmethod
    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """The provider's error envelope."""

    @abstractmethod
    def cache_prompts(self, fake: _TranslatingFake) -> None:
        """Until reset, the fake reports 6 of each prompt's tokens read from the prompt cache
        and, where the provider bills writing to it, 4 written to it."""

    @abstractmethod
    def sent_request(self) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of the request for MESSAGES with `sampling_fields` and
        max_tokens=50."""

    @abstractmethod
    def stream_request(self) -> tuple[str, dict[str, Any]]:
        """(path, fields of the JSON body) that ask the provider to stream."""

    @abstractmethod
    def weather_tool(self) -> Any:
        """WEATHER_TOOL as the provider is offered it, alone."""

    @abstractmethod
    def turns(self, request: dict[str, Any]) -> list[Any]:
        """The conversation of a request: its messages or contents, without the system
        prompt."""

    @abstractmethod
    def tool_turns(self, call_id: str, first_reply: dict[str, Any]) -> list[Any]:
        """The turns a request sends after the question when it answers the call `call_id` of
        get_weather for Paris (which the fake made in `first_reply`) with
        "18 degrees and sunny"."""

    @abstractmethod
    def called_model(self, call: RecordedCall) -> str:
        """The upstream model a recorded request asked for."""


class AnthropicUpstream(TranslatedUpstream[FakeAnthropic]):
    name = "anthropic"
    kind = "anthropic"
    provider = "anthropic-fake"
    key_env = "SWITCHBOARD_TEST_ANTHROPIC_KEY"
    secret = "fake-anthropic-secret"
    wrong_key = "sk-ant-wrong"
    wrong_key_detail = "x-api-key"  # Anthropic says "invalid x-api-key"
    model = "claude-test"
    upstream_model = "claude-test-upstream"
    catalog_price = {
        "input": "3.00",
        "output": "15.00",
        "cached_input": "0.30",
        "cache_write": "3.75",
    }
    price = Price(
        input_per_mtok_usd=Decimal("3.00"),
        output_per_mtok_usd=Decimal("15.00"),
        cached_input_per_mtok_usd=Decimal("0.30"),
        cache_write_input_per_mtok_usd=Decimal("3.75"),
    )
    reply_prefix = fake_anthropic.REPLY_PREFIX
    tool_reply_prefix = fake_anthropic.TOOL_REPLY_PREFIX
    overloaded_status = 529
    key_header = "x-api-key"
    request_headers = {"anthropic-version": "2023-06-01", "content-type": "application/json"}
    tool_call_id_prefix = "toolu_"  # Anthropic's own ids, passed through
    # The call's start (id and name), then the fake's two pieces of input JSON.
    tool_call_deltas = 3
    sampling_fields = {"temperature": 0.5, "stop": ["operator"]}

    def new_fake(self) -> FakeAnthropic:
        return FakeAnthropic(api_key=self.secret)

    def count_prompt_tokens(self, request: dict[str, Any]) -> int:
        return fake_anthropic.count_input_tokens(request)

    def reported(self, reply: dict[str, Any]) -> ReportedUsage:
        usage = reply["usage"]
        read, written = usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]
        return ReportedUsage(
            prompt_tokens=usage["input_tokens"] + read + written,
            output_tokens=usage["output_tokens"],
            cached_tokens=read,
            cache_write_tokens=written,
        )

    def reply_text(self, reply: dict[str, Any]) -> str:
        return "".join(block.get("text", "") for block in reply["content"])

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return fake_anthropic.error_body(status, message)

    def cache_prompts(self, fake: FakeAnthropic) -> None:
        fake.cache_read_input_tokens = 6
        fake.cache_creation_input_tokens = 4

    def sent_request(self) -> tuple[str, dict[str, Any]]:
        return "/v1/messages", {
            "model": self.upstream_model,
            "max_tokens": 50,
            "system": "You are terse.",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Say hello to the switchboard operator please"}
                    ],
                }
            ],
            "temperature": 0.5,
            "stop_sequences": ["operator"],
        }

    def stream_request(self) -> tuple[str, dict[str, Any]]:
        return "/v1/messages", {"stream": True}

    def weather_tool(self) -> Any:
        return [
            {
                "name": "get_weather",
                "description": "The current weather in a city.",
                "input_schema": WEATHER_TOOL["function"]["parameters"],
            }
        ]

    def turns(self, request: dict[str, Any]) -> list[Any]:
        return list(request["messages"])

    def tool_turns(self, call_id: str, first_reply: dict[str, Any]) -> list[Any]:
        return [
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": call_id,
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": call_id,
                        "content": "18 degrees and sunny",
                    }
                ],
            },
        ]

    def called_model(self, call: RecordedCall) -> str:
        return str(call.json["model"])


class GeminiUpstream(TranslatedUpstream[FakeGemini]):
    name = "gemini"
    kind = "gemini"
    provider = "gemini-fake"
    key_env = "SWITCHBOARD_TEST_GEMINI_KEY"
    secret = "fake-gemini-secret"
    wrong_key = "AIza-wrong"
    # Google says 400 INVALID_ARGUMENT, "API key not valid" (API_KEY_INVALID).
    wrong_key_detail = "API key"
    model = "gemini-test"
    upstream_model = "gemini-test-upstream"
    catalog_price = {"input": "1.25", "output": "10.00", "cached_input": "0.125"}
    price = Price(
        input_per_mtok_usd=Decimal("1.25"),
        output_per_mtok_usd=Decimal("10.00"),
        cached_input_per_mtok_usd=Decimal("0.125"),
    )
    reply_prefix = fake_gemini.REPLY_PREFIX
    tool_reply_prefix = fake_gemini.TOOL_REPLY_PREFIX
    overloaded_status = 503
    key_header = "x-goog-api-key"
    request_headers = {"content-type": "application/json"}
    # Fresh ids (Gemini gives none), which carry the call's thought signature.
    tool_call_id_prefix = "call_"
    tool_call_deltas = 1  # a functionCall arrives whole
    sampling_fields = {
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["operator"],
        "response_format": {"type": "json_object"},
    }

    def new_fake(self) -> FakeGemini:
        return FakeGemini(api_key=self.secret)

    def count_prompt_tokens(self, request: dict[str, Any]) -> int:
        return fake_gemini.count_prompt_tokens(request)

    def reported(self, reply: dict[str, Any]) -> ReportedUsage:
        usage = reply["usageMetadata"]
        return ReportedUsage(
            prompt_tokens=usage["promptTokenCount"],
            output_tokens=usage["candidatesTokenCount"] + usage.get("thoughtsTokenCount", 0),
            cached_tokens=usage.get("cachedContentTokenCount", 0),
        )

    def reply_text(self, reply: dict[str, Any]) -> str:
        parts = reply["candidates"][0]["content"]["parts"]
        return "".join(part.get("text", "") for part in parts)

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        return fake_gemini.error_body(status, message)

    def cache_prompts(self, fake: FakeGemini) -> None:
        fake.cached_content_tokens = 6  # Gemini bills no cache writes

    def sent_request(self) -> tuple[str, dict[str, Any]]:
        return f"/v1beta/models/{self.upstream_model}:generateContent", {
            "contents": [
                {
                    "role": "user",
                    "parts": [{"text": "Say hello to the switchboard operator please"}],
                }
            ],
            "systemInstruction": {"parts": [{"text": "You are terse."}]},
            "generationConfig": {
                "maxOutputTokens": 50,
                "temperature": 0.5,
                "topP": 0.9,
                "stopSequences": ["operator"],
                "responseMimeType": "application/json",
            },
        }

    def stream_request(self) -> tuple[str, dict[str, Any]]:
        return f"/v1beta/models/{self.upstream_model}:streamGenerateContent", {}

    def weather_tool(self) -> Any:
        return [
            {
                "functionDeclarations": [
                    {
                        "name": "get_weather",
                        "description": "The current weather in a city.",
                        "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"],
                    }
                ]
            }
        ]

    def turns(self, request: dict[str, Any]) -> list[Any]:
        return list(request["contents"])

    def tool_turns(self, call_id: str, first_reply: dict[str, Any]) -> list[Any]:
        # The call goes back with the signature it was issued with (Gemini 3 refuses it
        # without, and so does the fake).
        issued = first_reply["candidates"][0]["content"]["parts"][0]["thoughtSignature"]
        return [
            {
                "role": "model",
                "parts": [
                    {
                        "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                        "thoughtSignature": issued,
                    }
                ],
            },
            {
                "role": "user",
                "parts": [
                    {
                        "functionResponse": {
                            "name": "get_weather",
                            "response": {"output": "18 degrees and sunny"},
                        }
                    }
                ],
            },
        ]

    def called_model(self, call: RecordedCall) -> str:
        # From the path: `…/models/<model>:<method>`.
        return call.path.rsplit("/", 1)[-1].split(":")[0]


ANTHROPIC = AnthropicUpstream()
GEMINI = GeminiUpstream()


# --- the fixtures -----------------------------------------------------------------------------


def translated_upstream_fixtures(
    *upstreams: TranslatedUpstream[Any],
) -> tuple[Any, Any, Any, Any, Any]:
    """Fixtures for a test module to assign at its top level (`upstream, _fake_server, fake,
    routed_to_fake, two_deployments = translated_upstream_fixtures(ANTHROPIC, GEMINI)`):
    `upstream`, the provider, each of `upstreams` in turn when there are several (a test then
    runs once per provider, the tests grouped by provider); `_fake_server`, its fake, started
    once per module and provider; `fake`, that fake reset for the test, with the provider key
    set in the variable the catalog names; `routed_to_fake`, a catalog whose model routes to
    it; and `two_deployments`, one whose model routes to it twice, `deployment-1` then
    `deployment-2` (the first waits at most half a second for its first byte, and a Retry-After
    of up to two seconds is waited for on the same route)."""

    @pytest.fixture(
        scope="module",
        name="upstream",
        params=upstreams if len(upstreams) > 1 else None,
        ids=lambda upstream: upstream.name,
    )
    def provider(request: pytest.FixtureRequest) -> TranslatedUpstream[Any]:
        return getattr(request, "param", upstreams[0])

    @pytest.fixture(scope="module", name="_fake_server")
    def server(upstream: TranslatedUpstream[Any]) -> Iterator[FakeAnthropic | FakeGemini]:
        with upstream.new_fake() as started:
            yield started

    @pytest.fixture(name="fake")
    def fake(
        _fake_server: FakeAnthropic | FakeGemini,
        upstream: TranslatedUpstream[Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> FakeAnthropic | FakeGemini:
        _fake_server.reset()
        monkeypatch.setenv(upstream.key_env, upstream.secret)
        return _fake_server

    @pytest.fixture(name="routed_to_fake")
    def routed_to_fake(
        fake: FakeAnthropic | FakeGemini, upstream: TranslatedUpstream[Any], transactional_db: None
    ) -> None:
        catalog_load(data=upstream.catalog(fake, upstream.upstream_model))

    @pytest.fixture(name="two_deployments")
    def two_deployments(
        fake: FakeAnthropic | FakeGemini,
        upstream: TranslatedUpstream[Any],
        transactional_db: None,
        settings: Any,
    ) -> None:
        settings.GATEWAY_MAX_RETRY_AFTER_SECONDS = 2
        catalog = upstream.catalog(fake, "deployment-1", "deployment-2")
        catalog["models"][0]["routes"][0]["timeouts"] = {"first_byte": 0.5}
        catalog_load(data=catalog)

    return provider, server, fake, routed_to_fake, two_deployments


# --- answers the gateway cannot read ----------------------------------------------------------


def assert_an_unreadable_answer_fails_over(
    gateway_url: str, upstream: TranslatedUpstream[Any], fake: Any, answer: Any
) -> None:
    """With the model on `two_deployments`, `answer` from the first is not read: the second
    answers, and only its answer is charged."""
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    fake.answer_next(answer)

    raw = sdk(gateway_url, key).chat.completions.with_raw_response.create(
        model=upstream.model, messages=MESSAGES, max_tokens=50
    )

    assert raw.parse().choices[0].message.content == upstream.reply_text(fake.replies[0])
    assert [upstream.called_model(call) for call in fake.calls] == ["deployment-1", "deployment-2"]
    reported = upstream.reported(fake.replies[0])
    assert_charged_exactly(
        raw,
        org,
        price=upstream.price,
        input_tokens=reported.prompt_tokens,
        output_tokens=reported.output_tokens,
        provider=upstream.provider,
        upstream_model="deployment-2",
    )
    assert UsageRecord.objects.get().attempts == 2


def assert_an_unreadable_event_ends_the_stream(
    gateway_url: str, upstream: TranslatedUpstream[Any], fake: Any, event: Any
) -> None:
    """`event`, sent after the stream's first content, ends it with the upstream's error event
    (too late to fail over), and what was relayed is settled, as for a stream cut there."""
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    other_org = make_org(credit_usd="10")
    fake.send_event_next(event)
    received: list[str] = []

    with pytest.raises(openai.APIError) as caught:
        for chunk in sdk(gateway_url, key).chat.completions.create(
            model=upstream.model, messages=MESSAGES, max_tokens=50, stream=True
        ):
            received.extend(choice.delta.content or "" for choice in chunk.choices)

    assert caught.value.code == "upstream_stream_failed"
    assert "".join(received).startswith(upstream.reply_prefix.split()[0])
    record = UsageRecord.objects.get()
    assert record.organization_id == org.pk
    assert record.status == UsageRecord.Status.INTERRUPTED
    assert record.usage_source == UsageRecord.UsageSource.ESTIMATED
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == Decimal(10) - record.cost_usd
    assert wallet_balance_usd(organization_id=other_org.pk) == Decimal(10)
    assert Reservation.objects.get().state == Reservation.State.SETTLED
