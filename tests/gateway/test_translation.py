"""The pure translations between OpenAI's chat format and Anthropic's and Gemini's: requests one
way, answers and their usage the other, with no network and no database."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway import messages
from gateway.errors import InvalidRequest, UpstreamFailed, UpstreamStreamBroken
from gateway.providers import anthropic, gemini
from gateway.providers.base import TokenUsage, reported_usage
from gateway.streaming import StreamEnd, StreamEvent

CREATED = 1_700_000_000
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
PNG_DATA_URL = "data:image/png;base64,iVBORw0KGgo="
# An OpenAI conversation with a parallel tool call answered by two tool messages, then a
# follow-up question.
TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature_c": 18}'},
    {"role": "tool", "tool_call_id": "call_b", "content": "sunny, 24 C"},
    {"role": "user", "content": "Which is warmer?"},
]


def chat(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": messages, "max_tokens": 100, **fields}


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


# --- Anthropic: request ----------------------------------------------------------------------


def test_anthropic_system_messages_become_the_top_level_system() -> None:
    request = anthropic.request_to_anthropic(
        chat(
            [
                {"role": "system", "content": "You are terse."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Bonjour"},
                {"role": "user", "content": "Again"},
            ]
        ),
        model="claude-x",
    )

    assert request["model"] == "claude-x"
    assert request["system"] == "You are terse.\n\nAnswer in French."
    assert request["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Bonjour"}]},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]


def test_anthropic_sampling_fields_are_mapped() -> None:
    request = anthropic.request_to_anthropic(
        chat(user("hi"), temperature=0.2, top_p=0.9, stop="END", user="user-7", seed=4),
        model="c",
    )

    assert request["max_tokens"] == 100
    assert (request["temperature"], request["top_p"]) == (0.2, 0.9)
    assert request["stop_sequences"] == ["END"]
    assert request["metadata"] == {"user_id": "user-7"}
    assert "seed" not in request


def test_anthropic_max_completion_tokens_wins_and_one_limit_is_required() -> None:
    body = chat(user("hi"), max_completion_tokens=20)
    assert anthropic.request_to_anthropic(body, model="c")["max_tokens"] == 20

    del body["max_tokens"], body["max_completion_tokens"]
    with pytest.raises(InvalidRequest) as caught:
        anthropic.request_to_anthropic(body, model="c")
    assert caught.value.param == "max_tokens"


def test_anthropic_images_become_base64_or_url_blocks() -> None:
    request = anthropic.request_to_anthropic(
        chat(
            user(
                [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                ]
            )
        ),
        model="c",
    )

    assert request["messages"][0]["content"] == [
        {"type": "text", "text": "What is this?"},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
        },
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
    ]


@pytest.mark.parametrize(
    ("part", "param"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/bmp;base64,Qk0="}}, "image_url"),
        ({"type": "image_url", "image_url": {"url": "ftp://example.com/a.png"}}, "image_url"),
        ({"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}, "content[0]"),
    ],
)
def test_anthropic_refuses_content_it_cannot_carry(part: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        anthropic.request_to_anthropic(chat(user([part])), model="c")

    assert caught.value.param is not None
    assert caught.value.param.startswith("messages[0].content[0]")
    assert param in caught.value.param


def test_anthropic_tools_are_declared_with_their_input_schema() -> None:
    bare = {"type": "function", "function": {"name": "now"}}
    request = anthropic.request_to_anthropic(
        chat(user("hi"), tools=[WEATHER_TOOL, bare]), model="c"
    )

    assert request["tools"] == [
        {
            "name": "get_weather",
            "description": "The weather in a city.",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
        },
        {"name": "now", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert "tool_choice" not in request


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
def test_anthropic_tool_choice(tool_choice: Any, parallel: Any, expected: Any) -> None:
    fields: dict[str, Any] = {"tools": [WEATHER_TOOL], "tool_choice": tool_choice}
    if parallel is not None:
        fields["parallel_tool_calls"] = parallel

    request = anthropic.request_to_anthropic(chat(user("hi"), **fields), model="c")

    assert request["tool_choice"] == expected


def test_anthropic_tool_calls_and_results_become_tool_use_and_one_user_turn() -> None:
    request = anthropic.request_to_anthropic(chat(TOOL_CONVERSATION), model="c")

    assert request["system"] == "Be brief."
    assert request["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "call_a",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {
                    "type": "tool_use",
                    "id": "call_b",
                    "name": "get_weather",
                    "input": {"city": "Rome"},
                },
            ],
        },
        {
            # Both results, then the follow-up, in the one user turn after the calls.
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_a",
                    "content": '{"temperature_c": 18}',
                },
                {"type": "tool_result", "tool_use_id": "call_b", "content": "sunny, 24 C"},
                {"type": "text", "text": "Which is warmer?"},
            ],
        },
    ]


def test_anthropic_refuses_tool_arguments_that_are_not_a_json_object() -> None:
    messages = [
        *user("hi"),
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1"}}
            ],
        },
    ]
    with pytest.raises(InvalidRequest) as caught:
        anthropic.request_to_anthropic(chat(messages), model="c")

    assert caught.value.param == "messages[1].tool_calls[0].function.arguments"


def test_anthropic_json_schema_response_format_becomes_output_config() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    request = anthropic.request_to_anthropic(
        chat(
            user("hi"),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        ),
        model="c",
    )

    assert request["output_config"] == {"format": {"type": "json_schema", "schema": schema}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat([{"role": "function", "name": "f", "content": "x"}]), "messages[0].role"),
        (chat(user("hi"), n=2), "n"),
        (chat(user("hi"), tools=[{"type": "code_interpreter"}]), "tools[0]"),
        (chat(user("hi"), tools=[WEATHER_TOOL], tool_choice="sometimes"), "tool_choice"),
        (chat([{"role": "tool", "content": "x"}]), "messages[0]"),
    ],
)
def test_anthropic_refuses_what_it_cannot_translate(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        anthropic.request_to_anthropic(body, model="c")

    assert caught.value.param == param


# --- Anthropic: response ---------------------------------------------------------------------


def anthropic_message(**fields: Any) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 3},
        **fields,
    }


def to_openai_from_anthropic(message: Any) -> Any:
    return anthropic.response_to_openai(message, request={"messages": []}, created=CREATED)


def test_anthropic_answer_becomes_a_chat_completion() -> None:
    reply = to_openai_from_anthropic(
        anthropic_message(
            content=[{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world."}]
        )
    )

    assert reply.body == {
        "id": "chatcmpl-msg_01",
        "object": "chat.completion",
        "created": CREATED,
        "model": "claude-x",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world.", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        },
    }
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (12, 3)
    assert reply.usage.reported


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("model_context_window_exceeded", "length"),
        ("pause_turn", "stop"),
    ],
)
def test_anthropic_stop_reasons(stop_reason: str, finish_reason: str) -> None:
    reply = to_openai_from_anthropic(anthropic_message(stop_reason=stop_reason))

    assert reply.body["choices"][0]["finish_reason"] == finish_reason


def test_anthropic_tool_use_becomes_tool_calls_with_json_arguments() -> None:
    reply = to_openai_from_anthropic(
        anthropic_message(
            content=[
                {"type": "text", "text": "Let me check."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Zürich"},
                },
            ],
            stop_reason="tool_use",
        )
    )

    [choice] = reply.body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["id"] == "toolu_1"
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich"}


def test_anthropic_tool_calls_survive_the_round_trip() -> None:
    reply = to_openai_from_anthropic(
        anthropic_message(
            content=[{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}}],
            stop_reason="tool_use",
        )
    )
    assistant = reply.body["choices"][0]["message"]
    assert assistant["content"] is None

    request = anthropic.request_to_anthropic(
        chat(
            [
                *user("go"),
                assistant,
                {"role": "tool", "tool_call_id": "toolu_1", "content": "done"},
            ]
        ),
        model="c",
    )

    assert request["messages"][1:] == [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"}],
        },
    ]


def test_anthropic_cache_tokens_count_in_the_prompt_and_reads_are_billed_as_cached() -> None:
    reply = to_openai_from_anthropic(
        anthropic_message(
            usage={
                "input_tokens": 10,
                "cache_read_input_tokens": 100,
                "cache_creation_input_tokens": 20,
                "output_tokens": 7,
            }
        )
    )

    assert (reply.usage.input_tokens, reply.usage.cached_input_tokens) == (130, 100)
    assert reply.usage.output_tokens == 7
    assert reply.body["usage"]["prompt_tokens"] == 130
    assert reply.body["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 100,
        "cache_write_tokens": 20,
    }
    assert reply.body["usage"]["total_tokens"] == 137


def test_anthropic_null_cache_fields_count_as_zero() -> None:
    reply = to_openai_from_anthropic(
        anthropic_message(
            usage={
                "input_tokens": 5,
                "cache_read_input_tokens": None,
                "cache_creation_input_tokens": None,
                "output_tokens": 1,
            }
        )
    )

    assert (reply.usage.input_tokens, reply.usage.cached_input_tokens) == (5, 0)


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": -5, "output_tokens": 3},
        {"input_tokens": 5, "output_tokens": -3},
        {"input_tokens": 5, "output_tokens": "3"},
        {"input_tokens": 5, "output_tokens": 3, "cache_read_input_tokens": {"n": 1}},
    ],
)
def test_anthropic_usage_that_cannot_be_billed_is_estimated(usage: dict[str, Any]) -> None:
    # Charging it failed after the provider had answered: a 500, and no usage record.
    reply = to_openai_from_anthropic(anthropic_message(usage=usage))

    assert not reply.usage.reported
    assert min(reply.usage.input_tokens, reply.usage.output_tokens) >= 0


def test_anthropic_answer_without_usage_is_estimated() -> None:
    message = anthropic_message()
    del message["usage"]

    reply = anthropic.response_to_openai(
        message, request={"messages": [{"role": "user", "content": "x" * 40}]}, created=CREATED
    )

    assert not reply.usage.reported
    assert reply.usage.input_tokens > 0


@pytest.mark.parametrize("answer", [None, [], {"type": "message"}, {"content": "text"}])
def test_anthropic_answer_that_is_not_a_message_is_an_upstream_failure(answer: Any) -> None:
    with pytest.raises(UpstreamFailed):
        to_openai_from_anthropic(answer)


# --- Gemini: request -------------------------------------------------------------------------


def test_gemini_roles_and_system_instruction() -> None:
    request = gemini.request_to_gemini(
        chat(
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": [{"type": "text", "text": "Again"}]},
            ]
        )
    )

    assert request["systemInstruction"] == {"parts": [{"text": "You are terse."}]}
    assert request["contents"] == [
        {"role": "user", "parts": [{"text": "Hello"}]},
        {"role": "model", "parts": [{"text": "Hi"}]},
        {"role": "user", "parts": [{"text": "Again"}]},
    ]
    assert "model" not in request  # the model is in the URL


def test_gemini_generation_config() -> None:
    request = gemini.request_to_gemini(
        chat(
            user("hi"),
            max_completion_tokens=42,
            temperature=0.3,
            top_p=0.8,
            stop=["END", "STOP"],
            frequency_penalty=1,
        )
    )

    assert request["generationConfig"] == {
        "maxOutputTokens": 42,
        "temperature": 0.3,
        "topP": 0.8,
        "stopSequences": ["END", "STOP"],
    }


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "text"}, {}),
        ({"type": "json_object"}, {"responseMimeType": "application/json"}),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            {"responseMimeType": "application/json", "responseJsonSchema": {"type": "object"}},
        ),
    ],
)
def test_gemini_response_format(response_format: Any, expected: dict[str, Any]) -> None:
    config = gemini.request_to_gemini(chat(user("hi"), response_format=response_format))[
        "generationConfig"
    ]

    assert config == {"maxOutputTokens": 100, **expected}


def test_gemini_images_and_audio_become_inline_or_file_data() -> None:
    request = gemini.request_to_gemini(
        chat(
            user(
                [
                    {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg?x=1"}},
                    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                ]
            )
        )
    )

    assert request["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"fileUri": "https://example.com/a.jpg?x=1", "mimeType": "image/jpeg"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "AAAA"}},
    ]


def test_gemini_tools_are_function_declarations_with_json_schema() -> None:
    bare = {"type": "function", "function": {"name": "now"}}
    request = gemini.request_to_gemini(chat(user("hi"), tools=[WEATHER_TOOL, bare]))

    assert request["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "The weather in a city.",
                    "parametersJsonSchema": WEATHER_TOOL["function"]["parameters"],
                },
                {"name": "now"},
            ]
        }
    ]
    assert "toolConfig" not in request


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("none", {"mode": "NONE"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_weather"]},
        ),
    ],
)
def test_gemini_tool_choice(tool_choice: Any, expected: dict[str, Any]) -> None:
    request = gemini.request_to_gemini(
        chat(user("hi"), tools=[WEATHER_TOOL], tool_choice=tool_choice)
    )

    assert request["toolConfig"] == {"functionCallingConfig": expected}


def test_gemini_tool_calls_and_results_become_function_parts() -> None:
    request = gemini.request_to_gemini(chat(TOOL_CONVERSATION))

    assert request["contents"] == [
        {"role": "user", "parts": [{"text": "Weather in Paris and Rome?"}]},
        {
            "role": "model",
            "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                # Named after the call each answers; a JSON object is passed as it is, anything
                # else under "output".
                {"functionResponse": {"name": "get_weather", "response": {"temperature_c": 18}}},
                {
                    "functionResponse": {
                        "name": "get_weather",
                        "response": {"output": "sunny, 24 C"},
                    }
                },
                {"text": "Which is warmer?"},
            ],
        },
    ]


def test_gemini_a_tool_result_for_an_unknown_call_is_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        gemini.request_to_gemini(
            chat([*user("hi"), {"role": "tool", "tool_call_id": "call_x", "content": "1"}])
        )

    assert caught.value.param == "messages[1].tool_call_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat([{"role": "function", "name": "f", "content": "x"}]), "messages[0].role"),
        (chat(user("hi"), n=3), "n"),
        (chat(user([{"type": "file", "file": {}}])), "messages[0].content[0]"),
        (chat(user("hi"), tools=[WEATHER_TOOL], tool_choice={"type": "function"}), "tool_choice"),
        (chat(user("hi"), response_format={"type": "json_schema"}), "response_format"),
    ],
)
def test_gemini_refuses_what_it_cannot_translate(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        gemini.request_to_gemini(body)

    assert caught.value.param == param


# --- Gemini: response ------------------------------------------------------------------------


def gemini_response(parts: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {"role": "model", "parts": parts},
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 12,
            "candidatesTokenCount": 3,
            "totalTokenCount": 15,
        },
        "modelVersion": "gemini-x",
        "responseId": "resp1",
        **fields,
    }


def to_openai_from_gemini(answer: Any) -> Any:
    return gemini.response_to_openai(answer, request={"contents": []}, created=CREATED)


def test_gemini_answer_becomes_a_chat_completion() -> None:
    reply = to_openai_from_gemini(
        gemini_response(
            [{"text": "thinking it over", "thought": True}, {"text": "Hello, "}, {"text": "world."}]
        )
    )

    assert reply.body == {
        "id": "chatcmpl-resp1",
        "object": "chat.completion",
        "created": CREATED,
        "model": "gemini-x",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world.", "refusal": None},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }


@pytest.mark.parametrize(
    ("reason", "finish_reason"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("OTHER", "stop"),
        (None, "stop"),
    ],
)
def test_gemini_finish_reasons(reason: str | None, finish_reason: str) -> None:
    answer = gemini_response([{"text": "x"}])
    answer["candidates"][0]["finishReason"] = reason

    reply = to_openai_from_gemini(answer)

    assert reply.body["choices"][0]["finish_reason"] == finish_reason


def test_gemini_a_candidate_blocked_for_safety_has_no_content() -> None:
    answer = gemini_response([])
    answer["candidates"][0] = {"finishReason": "SAFETY", "index": 0}

    [choice] = to_openai_from_gemini(answer).body["choices"]

    assert choice["message"]["content"] is None
    assert choice["finish_reason"] == "content_filter"


@pytest.mark.parametrize(
    "metadata",
    [
        {"promptTokenCount": -12, "candidatesTokenCount": 3},
        {"promptTokenCount": 12, "candidatesTokenCount": 3, "cachedContentTokenCount": 50},
        {"promptTokenCount": 12, "candidatesTokenCount": [3]},
    ],
)
def test_gemini_usage_that_cannot_be_billed_is_estimated(metadata: dict[str, Any]) -> None:
    reply = to_openai_from_gemini(gemini_response([{"text": "Hi"}], usageMetadata=metadata))

    assert not reply.usage.reported
    assert min(reply.usage.input_tokens, reply.usage.output_tokens) >= 0


def test_gemini_a_blocked_prompt_is_an_empty_filtered_answer() -> None:
    reply = to_openai_from_gemini(
        {
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        }
    )

    [choice] = reply.body["choices"]
    assert choice["message"]["content"] is None
    assert choice["finish_reason"] == "content_filter"
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (9, 0)


def test_gemini_function_calls_become_tool_calls_that_carry_the_thought_signature() -> None:
    reply = to_openai_from_gemini(
        gemini_response(
            [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": "c2lnbmVk+/=",
                },
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
            ]
        )
    )

    [choice] = reply.body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    first, second = choice["message"]["tool_calls"]
    assert re.fullmatch(r"call_[0-9a-f]{24}~c2lnbmVk\+/=", first["id"])
    assert re.fullmatch(r"call_[0-9a-f]{24}", second["id"])
    assert first["type"] == "function"
    assert first["function"]["name"] == "get_weather"
    assert json.loads(first["function"]["arguments"]) == {"city": "Paris"}
    assert json.loads(second["function"]["arguments"]) == {"city": "Rome"}


def test_gemini_tool_calls_survive_the_round_trip_with_their_signature() -> None:
    reply = to_openai_from_gemini(
        gemini_response(
            [{"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "c2ln"}]
        )
    )
    assistant = reply.body["choices"][0]["message"]
    [call] = assistant["tool_calls"]

    request = gemini.request_to_gemini(
        chat([*user("go"), assistant, {"role": "tool", "tool_call_id": call["id"], "content": "7"}])
    )

    assert request["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "c2ln"}
            ],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "f", "response": {"output": "7"}}}],
        },
    ]


def test_gemini_usage_bills_thoughts_as_output_and_counts_cached_and_tool_prompt_tokens() -> None:
    reply = to_openai_from_gemini(
        gemini_response(
            [{"text": "x"}],
            usageMetadata={
                "promptTokenCount": 100,
                "cachedContentTokenCount": 40,
                "toolUsePromptTokenCount": 5,
                "candidatesTokenCount": 20,
                "thoughtsTokenCount": 30,
                "totalTokenCount": 155,
            },
        )
    )

    assert reply.usage.input_tokens == 105
    assert reply.usage.cached_input_tokens == 40
    assert reply.usage.output_tokens == 50
    assert reply.usage.reported
    assert reply.body["usage"] == {
        "prompt_tokens": 105,
        "completion_tokens": 50,
        "total_tokens": 155,
        "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }


def test_gemini_answer_without_usage_is_estimated() -> None:
    answer = gemini_response([{"text": "Hello there"}])
    del answer["usageMetadata"]

    reply = gemini.response_to_openai(
        answer, request={"contents": [{"role": "user", "parts": [{"text": "x" * 40}]}]}, created=1
    )

    assert not reply.usage.reported
    assert reply.usage.input_tokens > 0
    assert reply.usage.output_tokens > 0


@pytest.mark.parametrize("answer", [None, [], {}, {"candidates": []}, {"candidates": "x"}])
def test_gemini_answer_that_is_not_a_response_is_an_upstream_failure(answer: Any) -> None:
    with pytest.raises(UpstreamFailed):
        to_openai_from_gemini(answer)


# --- streams: provider events → OpenAI chunks ----------------------------------------------


async def _iterate(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _chunks(translate: Any, events: list[Any]) -> list[dict[str, Any]]:
    async def collect() -> list[dict[str, Any]]:
        return [chunk async for chunk in translate(_iterate(events), created=CREATED)]

    return asyncio.run(collect())


def _deltas(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]


ANTHROPIC_TOOL_STREAM: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "model": "claude-x",
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 5,
                "cache_creation_input_tokens": 2,
                "output_tokens": 1,
            },
        },
    },
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " me"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"city": '},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '"Paris"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 12},
    },
    {"type": "message_stop"},
]


def test_anthropic_stream_becomes_chunks_with_tool_calls_and_a_final_usage_chunk() -> None:
    chunks = _chunks(anthropic.stream_to_openai, ANTHROPIC_TOOL_STREAM)

    assert {chunk["id"] for chunk in chunks} == {"chatcmpl-msg_1"}
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert _deltas(chunks) == [
        {"role": "assistant", "content": ""},
        {"content": "Let"},
        {"content": " me"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    # message_start's prompt figures, message_delta's (cumulative) output tokens.
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 17,
        "completion_tokens": 12,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 5, "cache_write_tokens": 2},
    }


def test_anthropic_stream_stop_sequence_is_reported_in_the_finish_chunk() -> None:
    events = [
        ANTHROPIC_TOOL_STREAM[0],
        {
            "type": "message_delta",
            "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
            "usage": {"output_tokens": 3},
        },
        {"type": "message_stop"},
    ]

    finish = _chunks(anthropic.stream_to_openai, events)[-2]["choices"][0]

    assert (finish["finish_reason"], finish["stop_reason"]) == ("stop", "END")


@pytest.mark.parametrize(
    "events",
    [
        ANTHROPIC_TOOL_STREAM[:5],  # cut before message_stop
        [*ANTHROPIC_TOOL_STREAM[:4], {"type": "error", "error": {"type": "overloaded_error"}}],
    ],
    ids=["cut", "error-event"],
)
def test_anthropic_stream_that_ends_early_is_broken(events: list[Any]) -> None:
    with pytest.raises(UpstreamStreamBroken):
        _chunks(anthropic.stream_to_openai, events)


def test_anthropic_stream_without_usage_has_no_usage_chunk() -> None:
    events = [
        {"type": "message_start", "message": {"id": "msg_1", "model": "claude-x"}},
        *ANTHROPIC_TOOL_STREAM[2:6],
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}},
        {"type": "message_stop"},
    ]

    chunks = _chunks(anthropic.stream_to_openai, events)

    assert all(chunk["choices"] for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def _gemini_event(parts: list[Any], finish: str | None = None, **usage: int) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    event: dict[str, Any] = {"candidates": [candidate], "modelVersion": "g", "responseId": "r1"}
    if usage:
        event["usageMetadata"] = usage
    return event


def test_gemini_stream_becomes_chunks_with_the_last_usage() -> None:
    events = [
        _gemini_event([{"text": "Hello"}], promptTokenCount=7, candidatesTokenCount=1),
        _gemini_event(
            [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
            "STOP",
            promptTokenCount=7,
            candidatesTokenCount=4,
            cachedContentTokenCount=3,
        ),
    ]

    chunks = _chunks(gemini.stream_to_openai, events)

    deltas = _deltas(chunks)
    assert deltas[:2] == [{"role": "assistant", "content": ""}, {"content": "Hello"}]
    [call] = deltas[2]["tool_calls"]
    assert call["index"] == 0 and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["prompt_tokens"] == 7
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 3


def test_gemini_stream_that_ends_without_a_finish_reason_is_broken() -> None:
    events = [_gemini_event([{"text": "Hel"}], promptTokenCount=7, candidatesTokenCount=1)]

    with pytest.raises(UpstreamStreamBroken):
        _chunks(gemini.stream_to_openai, events)


# --- /v1/messages: Anthropic requests in, Anthropic answers out ----------------------------


def test_messages_request_becomes_an_openai_chat_request() -> None:
    body = {
        "model": "any",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"c": "P"}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [{"type": "text", "text": "sunny"}],
                    },
                    {"type": "text", "text": "Thanks"},
                ],
            },
        ],
        "tools": [{"name": "get_weather", "description": "d", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 5,
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }

    assert messages.request_to_openai(body) == {
        "model": "any",
        "max_tokens": 64,
        "stream": True,
        "messages": [
            {"role": "system", "content": "Be brief.\n\nBe kind."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"c": "P"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
            {"role": "user", "content": [{"type": "text", "text": "Thanks"}]},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object"},
                    "description": "d",
                },
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "u-1",
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"max_tokens": 0}, "max_tokens: must be a positive integer"),
        ({"messages": []}, "messages: at least one message is required"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "'document' are not supported",
        ),
    ],
)
def test_messages_request_refusals(change: dict[str, Any], message: str) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    body.update(change)
    body = {key: value for key, value in body.items() if value is not None}

    with pytest.raises(InvalidRequest, match=re.escape(message)):
        messages.request_to_openai(body)


def test_messages_answer_from_a_chat_completion_splits_the_cached_prompt() -> None:
    completion = {
        "id": "chatcmpl-abc",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Looking.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
            }
        ],
    }
    usage = TokenUsage(
        input_tokens=20, output_tokens=7, cached_input_tokens=8, cache_write_input_tokens=2
    )

    assert messages.message_from_openai(completion, usage) == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "output_tokens": 7,
            "cache_creation_input_tokens": 2,
            "cache_read_input_tokens": 8,
        },
    }


@pytest.mark.parametrize(
    "choice",
    [
        {"message": "hi"},
        {"message": {"content": "Hi", "tool_calls": [5, {"function": "f"}]}},
        {"message": {"content": "Hi", "tool_calls": "f"}},
    ],
)
def test_messages_answer_from_a_malformed_chat_completion_keeps_what_it_can(
    choice: dict[str, Any],
) -> None:
    # It was translated after the request was settled: a 500 for a charged request.
    usage = TokenUsage(input_tokens=3, output_tokens=1)

    message = messages.message_from_openai({"id": "x", "choices": [choice]}, usage)

    assert message["type"] == "message"
    assert all(block["type"] in ("text", "tool_use") for block in message["content"])
    assert message["usage"]["output_tokens"] == 1


def test_messages_events_from_openai_chunks() -> None:
    base = {"id": "chatcmpl-x", "model": "m", "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    call = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}
    stream: list[StreamEvent] = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hi"}),
        chunk({"tool_calls": [call]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":1}'}}]}),
        chunk({}, "tool_calls"),
        {**base, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
        StreamEnd(),
    ]
    translation = messages.MessageEvents()

    events = [event for sse in stream for event in translation.translate(sse)]

    parsed = []
    for event in events:
        name_line, data_line, *_ = event.decode().split("\n")
        data = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {data['type']}"
        parsed.append(data)
    assert [event["type"] for event in parsed] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert parsed[0]["message"]["id"] == "msg_x"
    assert parsed[3]["delta"] == {"type": "text_delta", "text": "Hi"}
    assert parsed[5]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "f",
        "input": {},
    }
    assert parsed[6] == {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"a":1}'},
    }
    assert parsed[8]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert parsed[8]["usage"] == {
        "input_tokens": 9,
        "output_tokens": 4,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def test_messages_events_end_with_an_error_event_when_the_stream_broke() -> None:
    translation = messages.MessageEvents()
    translation.translate({"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}}]})

    [event] = translation.translate(StreamEnd(UpstreamStreamBroken("It broke.")))

    assert event == (
        b'event: error\ndata: {"type": "error", "error": {"type": "api_error", '
        b'"message": "It broke."}}\n\n'
    )


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -5, "completion_tokens": 3},
        {"prompt_tokens": 5, "completion_tokens": -3},
        {"prompt_tokens": 2**31, "completion_tokens": 3},
        {"prompt_tokens": 5, "completion_tokens": 10**30},
        {"prompt_tokens": 5, "completion_tokens": "abc"},
        {"prompt_tokens": 5, "prompt_tokens_details": "x"},
        {"prompt_tokens": 5, "prompt_tokens_details": {"cached_tokens": 50}},
    ],
)
def test_openai_usage_that_cannot_be_billed_reports_none(usage: dict[str, Any]) -> None:
    assert reported_usage(usage) is None


def test_openai_usage_in_whole_numbers_written_as_floats_is_read() -> None:
    assert reported_usage({"prompt_tokens": 5, "completion_tokens": 3.0}) == TokenUsage(5, 3)
