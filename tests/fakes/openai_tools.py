"""The fake OpenAI-style upstream (tests/fakes/provider.py), able to call a tool as well.

A chat request that offers tools and whose last message is a user message mentioning
"weather" (or whose `tool_choice` is "required") gets a call of `get_weather` with
`{"city": "Paris"}`, whole or streamed in OpenAI's format (the call's id and name first, then
its arguments in two pieces, `finish_reason: "tool_calls"`, the usage chunk, `[DONE]`). A
`tool` message that answers no call of the assistant message before it is refused with 400,
as OpenAI refuses it. Every other request is answered by the plain fake.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Final

from tests.fakes.base import Receive, Scope, Send, read_body, send_json
from tests.fakes.provider import FakeProvider, RecordedCall, count_prompt_tokens

__all__ = ["TOOL_ARGUMENTS", "FakeToolCallingProvider"]

TOOL_ARGUMENTS: Final = {"city": "Paris"}


def _wants_tool(body: dict[str, Any]) -> str | None:
    tools = body.get("tools") or []
    messages = body.get("messages") or []
    if not tools or not messages or messages[-1].get("role") != "user":
        return None
    names = [tool["function"]["name"] for tool in tools]
    content = json.dumps(messages[-1].get("content")).lower()
    if body.get("tool_choice") == "required" or "weather" in content:
        return "get_weather" if "get_weather" in names else names[0]
    return None


def _unanswered_tool_message(messages: list[dict[str, Any]]) -> int | None:
    """The index of a `tool` message that answers no call of the assistant turn before it."""
    asked: set[str] = set()
    for index, message in enumerate(messages):
        if message.get("role") == "assistant":
            asked = {call["id"] for call in message.get("tool_calls") or []}
        elif message.get("role") == "tool":
            if message.get("tool_call_id") not in asked:
                return index
        else:
            asked = set()
    return None


class FakeToolCallingProvider(FakeProvider):
    """FakeProvider, plus tool calls (see the module's docstring)."""

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            await super()._app(scope, receive, send)
            return
        raw = await read_body(receive)
        if raw is None:
            return
        body = json.loads(raw)
        tool = _wants_tool(body)
        unanswered = _unanswered_tool_message(body.get("messages") or [])
        if tool is None and unanswered is None:
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": raw, "more_body": False}

            await super()._app(scope, replay, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        with self._lock:
            self.calls.append(RecordedCall(scope["method"], scope["path"], headers, body))
        if unanswered is not None:
            error = {
                "message": "Invalid parameter: messages with role 'tool' must be a response to "
                "a preceeding message with 'tool_calls'.",
                "type": "invalid_request_error",
                "param": f"messages.[{unanswered}].role",
                "code": None,
            }
            await send_json(send, 400, {"error": error})
            return
        assert tool is not None
        await self._tool_call(send, body, tool)

    async def _tool_call(self, send: Send, body: dict[str, Any], tool: str) -> None:
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        arguments = json.dumps(TOOL_ARGUMENTS)
        prompt = count_prompt_tokens(body["messages"])
        completion = len(tool.split()) + len(arguments.split())
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": body["model"],
        }
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": None,
                "refusal": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": tool, "arguments": arguments},
                    }
                ],
            }
            choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
            reply = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
            await send_json(send, 200, reply)
            return
        base["object"] = "chat.completion.chunk"
        half = len(arguments) // 2
        first = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": tool, "arguments": ""},
                }
            ],
        }
        deltas: list[tuple[dict[str, Any], str | None]] = [
            (first, None),
            ({"tool_calls": [{"index": 0, "function": {"arguments": arguments[:half]}}]}, None),
            ({"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]}, None),
            ({}, "tool_calls"),
        ]
        events = [
            {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            for delta, finish in deltas
        ]
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for event in [*(json.dumps(e) for e in events), "[DONE]"]:
            chunk = f"data: {event}\n\n".encode()
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
