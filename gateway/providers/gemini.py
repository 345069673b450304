"""Google's Gemini API (`POST {base_url}/models/{model}:generateContent`) behind the OpenAI chat
interface.

The translation is two pure functions, `request_to_gemini` and `response_to_openai`, so it can
be read and tested without a network; `GeminiAdapter` only sends what the first builds and
hands the answer to the second. Field names follow the v1beta REST reference
(GenerateContentRequest, GenerationConfig, FunctionDeclaration, GenerateContentResponse).

Two things have no place in OpenAI's format and are carried through it:
- Gemini answers a tool call with the function's *name*, while OpenAI answers with the call's
  id, so the name is looked up from the earlier assistant message that made the call;
- Gemini 3 signs each step's function calls (`thoughtSignature`) and refuses the next request
  (400) unless the signature comes back with the call. The gateway keeps no state, so the
  signature travels inside the tool call id, which OpenAI clients return verbatim.

What does not translate: penalties, seed, logit_bias, logprobs and `parallel_tool_calls` are
dropped; `n` > 1 is refused.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final
from urllib.parse import quote

import httpx

from gateway.errors import InvalidRequest, UnreadableAnswer, UpstreamStreamBroken
from gateway.providers.base import (
    TokenUsage,
    UpstreamReply,
    UpstreamStream,
    billable_usage,
    estimated_usage,
    openai_usage,
    shaped,
    token_count,
)
from gateway.providers.http import post_json
from gateway.providers.openai_request import (
    append_turn,
    assistant_content,
    content_parts,
    function_tools,
    image_url_of,
    required_max_tokens,
    split_data_url,
    text_of,
    unsupported_part,
)
from gateway.providers.sse import closer, event_data, open_event_stream
from gateway.selectors import RouteEntry

logger = logging.getLogger(__name__)

# Separates the tool call id from the thought signature it carries; no base64 alphabet has it.
SIGNATURE_SEPARATOR: Final = "~"

# Finish reasons meaning the answer was withheld or cut by a filter (OpenAI: content_filter).
_FILTERED: Final = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "LANGUAGE",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "MODEL_ARMOR",
    }
)

# `ErrorInfo.reason` values with which Google answers a bad API key, with HTTP 400.
_CREDENTIAL_REASONS: Final = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED"})


# --- request: OpenAI chat → Gemini generateContent ------------------------------------------


def request_to_gemini(body: dict[str, Any]) -> dict[str, Any]:
    """The generateContent request body for an OpenAI chat completion request.

    The model is not in the body: it is part of the URL. System (and developer) messages become
    `systemInstruction`; assistant turns are role `model`; tool results become `functionResponse`
    parts of a user turn, named after the call they answer; consecutive turns of one role are
    merged, which is how Gemini wants parallel function responses. Raises InvalidRequest for
    what cannot be translated.
    """
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    function_names: dict[str, str] = {}  # tool call id → the function it called
    messages = body.get("messages")
    for index, message in enumerate(messages if isinstance(messages, list) else []):
        where = f"messages[{index}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            text = text_of(message.get("content"), where=where)
            if text:
                system.append({"text": text})
        elif role == "user":
            append_turn(contents, "user", "parts", _user_parts(message.get("content"), where=where))
        elif role == "assistant":
            parts = _assistant_parts(message, where=where, function_names=function_names)
            append_turn(contents, "model", "parts", parts)
        elif role == "tool":
            part = _function_response_part(message, where=where, function_names=function_names)
            append_turn(contents, "user", "parts", [part])
        else:
            raise InvalidRequest(
                f"Messages with role '{role}' are not supported by this model.",
                param=f"{where}.role",
            )

    if body.get("n") not in (None, 1):
        raise InvalidRequest("This model answers one choice per request; set 'n' to 1.", param="n")
    request: dict[str, Any] = {"contents": contents}
    if system:
        request["systemInstruction"] = {"parts": system}
    request["generationConfig"] = _generation_config(body)
    declarations = _function_declarations(body.get("tools"))
    if declarations:
        request["tools"] = [{"functionDeclarations": declarations}]
        calling = _function_calling_config(body.get("tool_choice"))
        if calling is not None:
            request["toolConfig"] = {"functionCallingConfig": calling}
    return request


def _text_part(text: str) -> list[dict[str, Any]]:
    return [{"text": text}] if text else []


def _user_parts(content: Any, *, where: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for kind, part, part_where in content_parts(content, where=where):
        if kind == "text":
            parts.extend(_text_part(str(part.get("text", ""))))
        elif kind == "image_url":
            parts.append(_image_part(part.get("image_url"), where=part_where))
        elif kind == "input_audio":
            parts.append(_audio_part(part.get("input_audio"), where=part_where))
        else:
            raise unsupported_part(kind, where=part_where)
    return parts


def _image_part(image_url: Any, *, where: str) -> dict[str, Any]:
    url = image_url_of(image_url, where=where)
    if url.startswith(("http://", "https://")):
        file_data = {"fileUri": url}
        guessed, _ = mimetypes.guess_type(url.split("?", 1)[0])
        if guessed:
            file_data["mimeType"] = guessed  # optional for Gemini; sent when the URL tells it
        return {"fileData": file_data}
    mime_type, data = split_data_url(url, where=where)
    return {"inlineData": {"mimeType": mime_type, "data": data}}


def _audio_part(audio: Any, *, where: str) -> dict[str, Any]:
    if not isinstance(audio, dict) or not audio.get("data") or not audio.get("format"):
        raise InvalidRequest("'input_audio' needs 'data' and 'format'.", param=where)
    return {"inlineData": {"mimeType": f"audio/{audio['format']}", "data": audio["data"]}}


def _assistant_parts(
    message: dict[str, Any], *, where: str, function_names: dict[str, str]
) -> list[dict[str, Any]]:
    text, calls = assistant_content(message, where=where)
    parts = _text_part(text)
    for call in calls:
        # A later call with the same id (some clients reuse them across turns) answers to the
        # later tool messages, which is the order the messages come in.
        function_names[call.id] = call.name
        function_call: dict[str, Any] = {
            "functionCall": {"name": call.name, "args": call.arguments}
        }
        own_id, separator, signature = call.id.partition(SIGNATURE_SEPARATOR)
        if own_id.startswith("call_") and separator and signature:
            function_call["thoughtSignature"] = signature
        parts.append(function_call)
    return parts


def _function_response_part(
    message: dict[str, Any], *, where: str, function_names: dict[str, str]
) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    name = function_names.get(call_id) if isinstance(call_id, str) else None
    if name is None:
        raise InvalidRequest(
            "'tool_call_id' does not match a tool call of an earlier assistant message.",
            param=f"{where}.tool_call_id",
        )
    text = text_of(message.get("content"), where=where)
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    # Gemini wants an object: a JSON object result is passed as it is; anything else goes under
    # "output", the key the API reads as the function's output.
    response = value if isinstance(value, dict) else {"output": text}
    return {"functionResponse": {"name": name, "response": response}}


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {"maxOutputTokens": required_max_tokens(body)}
    for openai_name, gemini_name in (("temperature", "temperature"), ("top_p", "topP")):
        if body.get(openai_name) is not None:
            config[gemini_name] = body[openai_name]
    stop = body.get("stop")
    if isinstance(stop, str):
        config["stopSequences"] = [stop]
    elif isinstance(stop, list) and stop:
        config["stopSequences"] = [str(sequence) for sequence in stop]
    response_format = body.get("response_format")
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(
                "'response_format.json_schema.schema' is required.", param="response_format"
            )
        config["responseMimeType"] = "application/json"
        # responseJsonSchema takes JSON Schema as OpenAI clients write it; responseSchema takes
        # Google's OpenAPI subset, which refuses e.g. the additionalProperties strict mode sets.
        config["responseJsonSchema"] = schema
    return config


def _function_declarations(tools: Any) -> list[dict[str, Any]]:
    declarations: list[dict[str, Any]] = []
    for tool in function_tools(tools):
        declaration: dict[str, Any] = {"name": tool.name}
        if tool.description:
            declaration["description"] = tool.description
        if tool.parameters:
            # JSON Schema as the client wrote it (see responseJsonSchema above).
            declaration["parametersJsonSchema"] = tool.parameters
        declarations.append(declaration)
    return declarations


def _function_calling_config(choice: Any) -> dict[str, Any] | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"mode": "AUTO"}
    if choice == "none":
        return {"mode": "NONE"}
    if choice == "required":
        return {"mode": "ANY"}
    if (
        isinstance(choice, dict)
        and choice.get("type") == "function"
        and isinstance(choice.get("function"), dict)
        and choice["function"].get("name")
    ):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    raise InvalidRequest(
        "'tool_choice' must be 'auto', 'none', 'required' or a function.", param="tool_choice"
    )


# --- response: Gemini GenerateContentResponse → OpenAI chat.completion ----------------------


def response_to_openai(reply: Any, *, request: dict[str, Any], created: int) -> UpstreamReply:
    """The OpenAI chat.completion for a GenerateContentResponse, and the usage to bill.

    The first candidate's text parts are joined into `content` (thought summaries left out);
    its `functionCall` parts become `tool_calls` with fresh `call_…` ids, each carrying the
    part's thought signature if it had one. A prompt the API blocked (no candidates, a
    `promptFeedback.blockReason`) is an empty answer with finish_reason content_filter.
    Raises UnreadableAnswer when the answer is not a GenerateContentResponse (`shaped`: each
    value read must be of the type the API documents).
    """
    reply = shaped(reply, dict)
    candidates = shaped(reply.get("candidates"), list, default=[])
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    if candidates:
        candidate = shaped(candidates[0], dict)
        for piece in _answer_parts(candidate):
            if isinstance(piece, str):
                texts.append(piece)
            else:
                tool_calls.append(piece)
        finish_reason = _finish_reason(_gemini_finish_reason(candidate), bool(tool_calls))
    else:
        feedback = reply.get("promptFeedback")
        if not (isinstance(feedback, dict) and feedback.get("blockReason")):
            raise UnreadableAnswer("The provider's answer was not a chat completion.")
        finish_reason = "content_filter"
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    usage, reasoning_tokens = _usage(
        reply.get("usageMetadata"), request=request, completion="".join(texts)
    )
    upstream_id = reply.get("responseId")
    body = {
        "id": f"chatcmpl-{upstream_id}" if upstream_id else f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created,
        "model": reply.get("modelVersion"),
        "choices": [
            {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
        ],
        "usage": {
            **openai_usage(usage),
            "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
        },
    }
    return UpstreamReply(body=body, usage=usage)


def _answer_parts(candidate: dict[str, Any]) -> Iterator[str | dict[str, Any]]:
    """What a candidate's parts say, in order: each text part's text, and each `functionCall`
    part as an OpenAI tool call. Thought summaries, and parts of kinds never asked for, are
    left out; a candidate without content (a finish before any) says nothing."""
    content = shaped(candidate.get("content"), dict, default={})
    for part in shaped(content.get("parts"), list, default=[]):
        part = shaped(part, dict)
        if part.get("thought"):
            continue
        if "text" in part:
            yield shaped(part["text"], str)
        elif "functionCall" in part:
            yield _tool_call(part)


def _tool_call(part: dict[str, Any]) -> dict[str, Any]:
    call = shaped(part["functionCall"], dict)
    # Unique rather than numbered per answer: clients key tool state by id across turns.
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    signature = part.get("thoughtSignature")
    if isinstance(signature, str) and signature:
        call_id = f"{call_id}{SIGNATURE_SEPARATOR}{signature}"
    arguments = shaped(call.get("args"), dict, default={})
    return {
        "id": call_id,
        "type": "function",
        "function": {
            "name": shaped(call.get("name"), str),
            "arguments": json.dumps(arguments, ensure_ascii=False),
        },
    }


def _gemini_finish_reason(candidate: dict[str, Any]) -> str:
    """A candidate's `finishReason`; "" while it has none (a stream's candidate before its
    last)."""
    return shaped(candidate.get("finishReason"), str, default="")


def _finish_reason(reason: str, called_tools: bool) -> str:
    if reason == "MAX_TOKENS":
        return "length"
    if reason in _FILTERED:
        return "content_filter"
    # Gemini ends a turn of function calls with STOP; OpenAI says tool_calls.
    return "tool_calls" if called_tools else "stop"


def _usage(metadata: Any, *, request: dict[str, Any], completion: str) -> tuple[TokenUsage, int]:
    """The usage to bill, and the reasoning ("thoughts") tokens among the output tokens."""
    reported = _reported_usage(metadata)
    if reported is None:
        # Gemini reports usage with every answer; should it not, the answer is still charged.
        estimated = estimated_usage(prompt=request.get("contents", []), completion=completion)
        return estimated, 0
    return reported


def _reported_usage(metadata: Any) -> tuple[TokenUsage, int] | None:
    if not isinstance(metadata, dict) or not isinstance(metadata.get("promptTokenCount"), int):
        return None
    prompt, tool_prompt, candidates, thoughts = (
        token_count(metadata.get(name))
        for name in (
            "promptTokenCount",
            "toolUsePromptTokenCount",
            "candidatesTokenCount",
            "thoughtsTokenCount",
        )
    )
    if prompt is None or tool_prompt is None or candidates is None or thoughts is None:
        return None
    # promptTokenCount already includes the cached tokens; the prompt built by tool use (e.g.
    # search results) and the thinking are counted apart, and billed as input and output.
    usage = billable_usage(
        input_tokens=prompt + tool_prompt,
        output_tokens=candidates + thoughts,
        cached_input_tokens=token_count(metadata.get("cachedContentTokenCount")),
    )
    return None if usage is None else (usage, thoughts)


def _credential_rejected(response: httpx.Response) -> bool:
    """Whether a 400 is Google refusing our API key (our failure, not the caller's)."""
    try:
        details = response.json()["error"]["details"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(details, list) and any(
        isinstance(detail, dict) and detail.get("reason") in _CREDENTIAL_REASONS
        for detail in details
    )


def _model_path(upstream_model: str) -> str:
    # The catalog may name the model bare ("gemini-2.5-flash") or as a resource name
    # ("models/…", "tunedModels/…"); each segment is escaped so a name cannot change the path.
    name = upstream_model if "/" in upstream_model else f"models/{upstream_model}"
    return "/".join(quote(segment, safe="") for segment in name.split("/"))


class GeminiAdapter:
    async def chat_completion(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamReply:
        """POST the translated request to `{base_url}/models/{model}:generateContent` and
        translate the answer back. The key goes in a header, never in the URL."""
        request = request_to_gemini(body)
        reply = await post_json(
            route=route,
            url=f"{route.base_url}/{_model_path(route.upstream_model)}:generateContent",
            payload=request,
            headers=_headers(secret),
            credential_rejected=_credential_rejected,
        )
        return response_to_openai(reply, request=request, created=int(time.time()))

    async def chat_completion_stream(
        self, *, route: RouteEntry, body: dict[str, Any], secret: str
    ) -> UpstreamStream:
        """POST the translated request to `…:streamGenerateContent?alt=sse` and open its event
        stream, translated to OpenAI chunks by `stream_to_openai`."""
        response = await open_event_stream(
            route=route,
            url=f"{route.base_url}/{_model_path(route.upstream_model)}"
            ":streamGenerateContent?alt=sse",
            payload=request_to_gemini(body),
            headers=_headers(secret),
            credential_rejected=_credential_rejected,
        )
        chunks = stream_to_openai(event_data(route, response), created=int(time.time()))
        return UpstreamStream(chunks=chunks, close=closer(response))


def _headers(secret: str) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    if secret:
        headers["x-goog-api-key"] = secret
    return headers


# --- stream: GenerateContentResponse events → OpenAI chat.completion.chunk -----------------


async def stream_to_openai(
    events: AsyncIterator[Any], *, created: int
) -> AsyncIterator[dict[str, Any]]:
    """OpenAI chunks for a `streamGenerateContent?alt=sse` stream, ending with the usage chunk.

    Each event is a whole GenerateContentResponse holding the next parts of the first
    candidate: text parts become `content`, each `functionCall` part a complete tool call.
    The stream has no end marker: it is complete when the connection ends after a
    `finishReason`, and broken (UpstreamStreamBroken) when it ends before one or carries an
    `error`; an event not of the API's shape is UnreadableAnswer (`shaped`), which ends the
    stream as a break does (gateway/streaming.py). Usage is the last `usageMetadata` seen
    (each event repeats the totals so far).
    """
    base: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": None,
    }
    usage: TokenUsage | None = None
    tool_calls = 0
    finish_reason: str | None = None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    async for reply in events:
        if not isinstance(reply, dict) or "error" in reply:
            logger.warning("gemini reported an error mid-stream")
            raise UpstreamStreamBroken("The provider failed in the middle of the stream.")
        if base["model"] is None:
            if reply.get("responseId"):
                base["id"] = f"chatcmpl-{reply['responseId']}"
            base["model"] = reply.get("modelVersion")
            yield chunk({"role": "assistant", "content": ""})
        reported = _reported_usage(reply.get("usageMetadata"))
        if reported is not None:
            usage = reported[0]
        candidates = shaped(reply.get("candidates"), list, default=[])
        if not candidates:
            feedback = reply.get("promptFeedback")
            if isinstance(feedback, dict) and feedback.get("blockReason"):
                finish_reason = "content_filter"
                yield chunk({}, finish_reason)
            continue
        candidate = shaped(candidates[0], dict)
        for piece in _answer_parts(candidate):
            if isinstance(piece, str):
                if piece:
                    yield chunk({"content": piece})
            else:
                yield chunk({"tool_calls": [{"index": tool_calls, **piece}]})
                tool_calls += 1
        reason = _gemini_finish_reason(candidate)
        if reason:
            finish_reason = _finish_reason(reason, tool_calls > 0)
            yield chunk({}, finish_reason)
    if finish_reason is None:
        raise UpstreamStreamBroken("The provider's stream broke off.")
    if usage is not None:
        yield {**base, "choices": [], "usage": openai_usage(usage)}
