"""What the fakes of the APIs the gateway translates to (tests/fakes/anthropic.py,
tests/fakes/gemini.py) share: a request is read and recorded, then answered as scripted or by the
fake itself; every answer it gives is recorded too, and its next streams can be scripted to break.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Generic, TypeVar

from tests.fakes.base import (
    FakeUpstream,
    Receive,
    Scope,
    ScriptedAnswer,
    ScriptedFaults,
    Send,
    read_body,
)
from tests.fakes.provider import RecordedCall

_StreamFault = TypeVar("_StreamFault")


class RecordingFake(ScriptedFaults[ScriptedAnswer], FakeUpstream, Generic[_StreamFault]):
    """A fake that records every request in `calls` and every answer it gives in `replies`.

    `fail_next` and `delay_next` script what the next requests get before anything else;
    a subclass answers the others in `_answer` and queues faults of its streams (its own
    `_StreamFault`) with `_queue_stream_fault`, each consumed by the next streamed answer.
    """

    _answer_type = ScriptedAnswer
    _no_stream_fault: _StreamFault  # what a stream suffers when no fault is queued

    def __init__(self, *, api_key: str | None = None) -> None:
        """Create a stopped fake that accepts `api_key`, or any key when None."""
        super().__init__()
        self.api_key = api_key
        self.calls: list[RecordedCall] = []
        self.replies: list[dict[str, Any]] = []
        self._stream_faults: deque[_StreamFault] = deque()
        self._reset_settings()

    def reset(self) -> None:
        """Forget calls, replies and pending faults; restore the settings."""
        with self._lock:
            self.calls.clear()
            self.replies.clear()
            self._script.clear()
            self._stream_faults.clear()
            self._reset_settings()

    def _reset_settings(self) -> None:
        """Set the settings that last until `reset` to their defaults."""

    def _queue_stream_fault(self, fault: _StreamFault) -> None:
        with self._lock:
            self._stream_faults.append(fault)

    def _record_reply(self, reply: dict[str, Any], *, streamed: bool) -> _StreamFault:
        """Record `reply`, and return what its stream is to suffer: the next queued fault if it
        is streamed and one is queued, else none."""
        with self._lock:
            self.replies.append(reply)
            if streamed and self._stream_faults:
                return self._stream_faults.popleft()
        return self._no_stream_fault

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        if raw is None:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        call = RecordedCall(scope["method"], scope["path"], headers, body)
        with self._lock:
            self.calls.append(call)
        if await self._answered_as_scripted(send, self._next_scripted()):
            return
        await self._answer(scope, call, send)

    async def _answer(self, scope: Scope, call: RecordedCall, send: Send) -> None:
        """Answer a request nothing was scripted for, as the real API would."""
        raise NotImplementedError
