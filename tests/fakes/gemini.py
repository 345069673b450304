"""A fake Google Gemini upstream that speaks `generateContent` (v1beta REST) over real HTTP.

The gateway talks to it exactly as it would talk to generativelanguage.googleapis.com: the
`x-goog-api-key` header (or `?key=`), `POST /v1beta/models/{model}:generateContent`, Google's
JSON shapes and Google's error envelope. It checks requests the way the real API does where a
translation could go wrong: unknown fields (the real API's "Unknown name … Cannot find field"),
a function response turn that does not follow a function call turn with as many parts, and —
like Gemini 3 — a function call sent back without the `thoughtSignature` it was issued with.
Authentication fails as Google's does: no key is 403 PERMISSION_DENIED, a wrong key is 400
INVALID_ARGUMENT with the reason API_KEY_INVALID.

Answers are deterministic. A request that declares functions and whose last user text mentions
"weather" gets a `functionCall` of `get_weather` with `{"city": "Paris"}` (signed); a request
that ends with function responses gets "The tool answered: …"; anything else gets a fixed
sentence echoing the last user text, cut to `maxOutputTokens` words or at a stop sequence. One
word is one token. Every request is recorded in `calls` and every answer in `replies`.

Like tests/fakes/provider.py it is a raw ASGI application served by uvicorn in a thread.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs

from tests.fakes.base import Scope, Send, send_json
from tests.fakes.provider import RecordedCall, cut_connection
from tests.fakes.recording import RecordingFake

__all__ = ["REPLY_PREFIX", "TOOL_REPLY_PREFIX", "FakeGemini", "count_prompt_tokens", "error_body"]


REPLY_PREFIX: Final = "Hello from the fake Gemini provider. You said:"
TOOL_REPLY_PREFIX: Final = "The tool answered:"
#: Tokens the fake charges per content (turn) on top of its words.
TOKENS_PER_CONTENT: Final = 3
_ECHOED_WORDS: Final = 5
_PATH: Final = re.compile(
    r"^/v1beta/models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent)$"
)

# The fields of GenerateContentRequest and GenerationConfig that the fake knows.
_REQUEST_FIELDS: Final = frozenset(
    {
        "contents",
        "systemInstruction",
        "generationConfig",
        "tools",
        "toolConfig",
        "safetySettings",
        "cachedContent",
    }
)
_GENERATION_FIELDS: Final = frozenset(
    {
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "stopSequences",
        "candidateCount",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "presencePenalty",
        "frequencyPenalty",
        "seed",
        "thinkingConfig",
        "responseModalities",
    }
)
_PART_DATA: Final = ("text", "inlineData", "fileData", "functionCall", "functionResponse")
_STATUSES: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


# --- deterministic "model" ------------------------------------------------------------------


def _words_of(parts: Any) -> list[str]:
    words: list[str] = []
    for part in parts if isinstance(parts, list) else []:
        if not isinstance(part, Mapping):
            continue
        if isinstance(part.get("text"), str):
            words += part["text"].split()
        elif isinstance(part.get("functionCall"), Mapping):
            call = part["functionCall"]
            words += [str(call.get("name")), *json.dumps(call.get("args")).split()]
        elif isinstance(part.get("functionResponse"), Mapping):
            words += json.dumps(part["functionResponse"].get("response")).split()
    return words


def count_prompt_tokens(request: Mapping[str, Any]) -> int:
    """The fake's prompt tokens for a generateContent request: the words of the system
    instruction and of every content (function calls and responses included), plus 3 per
    content."""
    system = request.get("systemInstruction") or {}
    return len(_words_of(system.get("parts"))) + sum(
        len(_words_of(content.get("parts"))) + TOKENS_PER_CONTENT
        for content in request.get("contents") or []
    )


def _function_responses(content: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p["functionResponse"] for p in content.get("parts", []) if "functionResponse" in p]


def _function_calls(content: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [p for p in content.get("parts", []) if "functionCall" in p]


def _last_user_text(contents: list[dict[str, Any]]) -> str:
    for content in reversed(contents):
        if content.get("role") != "user":
            continue
        texts = [p["text"] for p in content.get("parts", []) if isinstance(p.get("text"), str)]
        if texts:
            return " ".join(texts)
    return ""


def _wanted_function(request: dict[str, Any]) -> str | None:
    """The function the fake calls for this request, if any."""
    names = [
        declaration["name"]
        for tool in request.get("tools") or []
        for declaration in tool.get("functionDeclarations") or []
    ]
    config = (request.get("toolConfig") or {}).get("functionCallingConfig") or {}
    mode = config.get("mode", "AUTO")
    if not names or mode == "NONE" or _function_responses(request["contents"][-1]):
        return None
    if mode != "ANY" and "weather" not in _last_user_text(request["contents"]).lower():
        return None
    allowed = config.get("allowedFunctionNames") or names
    return "get_weather" if "get_weather" in allowed else str(allowed[0])


def _text_reply(request: dict[str, Any]) -> tuple[str, str]:
    """(text, finishReason) for a request the fake answers with text."""
    config = request.get("generationConfig") or {}
    responses = _function_responses(request["contents"][-1])
    if responses:
        response = responses[0].get("response") or {}
        output = response.get("output") if isinstance(response.get("output"), str) else None
        echoed = (output if output is not None else json.dumps(response)).split()
        words = [*TOOL_REPLY_PREFIX.split(), *echoed[:_ECHOED_WORDS]]
    else:
        echoed = _last_user_text(request["contents"]).split()[:_ECHOED_WORDS]
        words = [*REPLY_PREFIX.split(), *echoed]
    text = " ".join(words)
    for sequence in config.get("stopSequences") or []:
        if sequence in text:
            return text[: text.index(sequence)], "STOP"  # Gemini says STOP for stop sequences
    limit = config.get("maxOutputTokens")
    if isinstance(limit, int) and len(words) > limit:
        return " ".join(words[:limit]), "MAX_TOKENS"
    return text, "STOP"


# --- request checks, as the real API makes them ---------------------------------------------


class _Invalid(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _unknown(name: str, at: str | None = None) -> _Invalid:
    where = f" at '{at}'" if at else ""
    return _Invalid(
        f'Invalid JSON payload received. Unknown name "{name}"{where}: Cannot find field.'
    )


def _check_request(body: Any, issued_signatures: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _Invalid("Invalid JSON payload received. Expected an object.")
    for name in body:
        if name not in _REQUEST_FIELDS:
            raise _unknown(name)
    config = body.get("generationConfig") or {}
    for name in config:
        if name not in _GENERATION_FIELDS:
            raise _unknown(name, "generation_config")
    if "responseSchema" in config and "responseJsonSchema" in config:
        raise _Invalid("responseSchema and responseJsonSchema cannot both be set.")
    if "responseJsonSchema" in config and config.get("responseMimeType") != "application/json":
        raise _Invalid("responseJsonSchema requires responseMimeType application/json.")
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _Invalid("* GenerateContentRequest.contents: contents is not specified")
    for index, content in enumerate(contents):
        _check_content(content, index, contents)
    _check_signatures(contents, issued_signatures)
    for tool in body.get("tools") or []:
        for declaration in tool.get("functionDeclarations") or []:
            if not declaration.get("name"):
                raise _Invalid("* GenerateContentRequest.tools[0].function_declarations: name")
            if "parameters" in declaration and "parametersJsonSchema" in declaration:
                raise _Invalid("parameters and parametersJsonSchema cannot both be set.")
    config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if config.get("mode", "AUTO") not in {"AUTO", "ANY", "NONE", "VALIDATED"}:
        raise _Invalid("Invalid value at 'tool_config.function_calling_config.mode'")
    if config.get("allowedFunctionNames") and config.get("mode") != "ANY":
        raise _Invalid("allowed_function_names may only be set when the mode is ANY.")
    return body


def _check_content(content: Any, index: int, contents: list[Any]) -> None:
    where = f"contents[{index}]"
    if not isinstance(content, dict) or content.get("role") not in {"user", "model"}:
        raise _Invalid(f"* GenerateContentRequest.{where}.role: must be 'user' or 'model'")
    parts = content.get("parts")
    if not isinstance(parts, list) or not parts:
        raise _Invalid(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.")
    for number, part in enumerate(parts):
        data = [name for name in _PART_DATA if name in part] if isinstance(part, dict) else []
        if len(data) != 1:
            raise _Invalid(f"* GenerateContentRequest.{where}.parts[{number}].data: required oneof")
        for name in part:
            if name not in {*_PART_DATA, "thought", "thoughtSignature"}:
                raise _unknown(name, f"contents[{index}].parts[{number}]")
    responses = _function_responses(content)
    if responses:
        previous = contents[index - 1] if index else {}
        calls = _function_calls(previous) if previous.get("role") == "model" else []
        if not calls:
            raise _Invalid(
                "Please ensure that function response turn comes immediately after a function "
                "call turn."
            )
        if len(calls) != len(responses):
            raise _Invalid(
                "Please ensure that the number of function response parts is equal to the number "
                "of function call parts of the function call turn."
            )
        if [c["functionCall"].get("name") for c in calls] != [r.get("name") for r in responses]:
            raise _Invalid("Function response names must match the function call names.")


def _check_signatures(contents: list[dict[str, Any]], issued: set[str]) -> None:
    """Gemini 3: in the current turn (since the last user text), each step's first function
    call must carry the signature it was issued with."""
    start = 0
    for index, content in enumerate(contents):
        if content["role"] == "user" and any("text" in part for part in content["parts"]):
            start = index
    for index in range(start, len(contents)):
        calls = _function_calls(contents[index]) if contents[index]["role"] == "model" else []
        if not calls:
            continue
        signature = calls[0].get("thoughtSignature")
        if signature is None:
            name = calls[0]["functionCall"].get("name")
            raise _Invalid(
                f"Function call `{name}` in the {index + 1}. content block is missing a "
                "`thought_signature`."
            )
        if signature not in issued:
            raise _Invalid("Corrupted thought signature.")


# --- the server -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamFault:
    cut_after_events: int | None = None  # connection dropped after this many text events
    omit_usage: bool = False  # no `usageMetadata` in any event
    extra_event: Any = None  # sent as is right after the first event


def error_body(status: int, message: str, details: list[Any] | None = None) -> dict[str, Any]:
    """Google's error envelope."""
    error: dict[str, Any] = {
        "code": status,
        "message": message,
        "status": _STATUSES.get(status, "UNKNOWN"),
    }
    if details:
        error["details"] = details
    return {"error": error}


class FakeGemini(RecordingFake[_StreamFault]):
    """A Gemini-compatible upstream on 127.0.0.1 at a free port, served in a thread.

    Point clients at `base_url` (`http://127.0.0.1:<port>/v1beta`). With `api_key` set, only
    that key is accepted; otherwise any non-empty key is. `fail_next` and `delay_next` queue
    faults, one per request. Until `reset()`, `cached_content_tokens` of each prompt are
    reported as served from the cache and `thoughts_tokens` are reported as spent thinking.
    """

    api_root = "/v1beta"
    _no_stream_fault = _StreamFault()

    def __init__(self, *, api_key: str | None = None) -> None:
        """Create a stopped fake that accepts `api_key`, or any key when None."""
        super().__init__(api_key=api_key)
        self._issued_signatures: set[str] = set()

    def _reset_settings(self) -> None:
        self.cached_content_tokens = 0
        self.thoughts_tokens = 0

    def cut_stream_after(self, events: int) -> None:
        """The next streamed answer loses its connection after `events` events of text,
        before the event with the finishReason."""
        self._queue_stream_fault(_StreamFault(cut_after_events=events))

    def omit_usage_next(self) -> None:
        """The next streamed answer is complete but carries no `usageMetadata`."""
        self._queue_stream_fault(_StreamFault(omit_usage=True))

    def send_event_next(self, event: Any) -> None:
        """The next streamed answer gets `event` (any JSON value: an event of a shape Gemini
        does not send, say) as its data right after its first event."""
        self._queue_stream_fault(_StreamFault(extra_event=event))

    def _error_body_for(self, status: int) -> dict[str, Any]:
        return error_body(status, _scripted_message(status))

    async def _send_json(
        self, send: Send, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        await _send_json(send, status, payload, headers)

    async def _answer(self, scope: Scope, call: RecordedCall, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        key = call.headers.get("x-goog-api-key") or (query.get("key") or [""])[0]
        if not key:
            await _send_json(send, 403, error_body(403, _NO_KEY))
            return
        if self.api_key is not None and key != self.api_key:
            await _send_json(send, 400, error_body(400, _BAD_KEY, _BAD_KEY_DETAILS))
            return
        matched = _PATH.match(call.path)
        if call.method != "POST" or matched is None:
            await _send_json(send, 404, error_body(404, "Requested entity was not found."))
            return
        try:
            request = _check_request(call.json, self._issued_signatures)
        except _Invalid as invalid:
            await _send_json(send, 400, error_body(400, invalid.message))
            return
        reply = self._response(request, matched["model"])
        streamed = matched["method"] == "streamGenerateContent"
        if streamed and query.get("alt") != ["sse"]:
            await _send_json(send, 400, error_body(400, "This fake streams with alt=sse only."))
            return
        fault = self._record_reply(reply, streamed=streamed)
        if streamed:
            await _send_stream(send, reply, fault)
        else:
            await _send_json(send, 200, reply)

    def _response(self, request: dict[str, Any], model: str) -> dict[str, Any]:
        function = _wanted_function(request)
        parts: list[dict[str, Any]]
        if function is not None:
            signature = base64.b64encode(secrets.token_bytes(24)).decode()
            with self._lock:
                self._issued_signatures.add(signature)
            parts = [
                {
                    "functionCall": {"name": function, "args": {"city": "Paris"}},
                    "thoughtSignature": signature,
                }
            ]
            finish_reason = "STOP"
        else:
            text, finish_reason = _text_reply(request)
            parts = [{"text": text}]
        prompt = count_prompt_tokens(request)
        candidates = len(_words_of(parts))
        usage: dict[str, Any] = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": prompt + candidates + self.thoughts_tokens,
        }
        if self.cached_content_tokens:
            usage["cachedContentTokenCount"] = min(self.cached_content_tokens, prompt)
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        return {
            "candidates": [
                {
                    "content": {"role": "model", "parts": parts},
                    "finishReason": finish_reason,
                    "index": 0,
                }
            ],
            "usageMetadata": usage,
            "modelVersion": model,
            "responseId": uuid.uuid4().hex[:22],
        }


_NO_KEY: Final = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)
_BAD_KEY: Final = "API key not valid. Please pass a valid API key."
_BAD_KEY_DETAILS: Final = [
    {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
]


def _scripted_message(status: int) -> str:
    if status == 401:
        return "Request had invalid authentication credentials."
    if status == 429:
        return "Resource has been exhausted (e.g. check quota)."
    if status >= 500:
        return f"An internal error has occurred (scripted {status})."
    return f"Scripted failure {status}."


async def _send_json(
    send: Send, status: int, payload: Any, headers: Mapping[str, str] | None = None
) -> None:
    await send_json(
        send,
        status,
        payload,
        headers,
        default_headers={"content-type": "application/json; charset=UTF-8"},
    )


def _stream_events(reply: dict[str, Any], fault: _StreamFault) -> list[Any]:
    """`reply` as streamGenerateContent sends it: GenerateContentResponses of one word of text
    each (a function call comes whole, in one), each with the usage so far, the last with the
    finishReason. `cut_after_events` drops the tail, finishReason included."""
    candidate = reply["candidates"][0]
    usage = reply["usageMetadata"]
    pieces: list[dict[str, Any]] = []
    for part in candidate["content"]["parts"]:
        if "text" in part:
            words = part["text"].split(" ")
            pieces += [{"text": w if not i else f" {w}"} for i, w in enumerate(words)]
        else:
            pieces.append(part)
    events: list[Any] = []
    for number, part in enumerate(pieces):
        if fault.cut_after_events is not None and number >= fault.cut_after_events:
            break
        last = number == len(pieces) - 1
        event_candidate: dict[str, Any] = {
            "content": {"role": "model", "parts": [part]},
            "index": 0,
        }
        if last:
            event_candidate["finishReason"] = candidate["finishReason"]
        so_far = len(_words_of(pieces[: number + 1]))
        event: dict[str, Any] = {
            "candidates": [event_candidate],
            "usageMetadata": usage
            if last
            else {
                "promptTokenCount": usage["promptTokenCount"],
                "candidatesTokenCount": so_far,
                "totalTokenCount": usage["promptTokenCount"] + so_far,
            },
            "modelVersion": reply["modelVersion"],
            "responseId": reply["responseId"],
        }
        if fault.omit_usage:
            del event["usageMetadata"]
        events.append(event)
        if number == 0 and fault.extra_event is not None:
            events.append(fault.extra_event)
    return events


async def _send_stream(send: Send, reply: dict[str, Any], fault: _StreamFault) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    for event in _stream_events(reply, fault):
        # Google ends each event with CRLF CRLF.
        data = f"data: {json.dumps(event)}\r\n\r\n"
        await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
    if fault.cut_after_events is not None:
        await cut_connection()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
