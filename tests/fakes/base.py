"""What the fake upstreams share: serving their ASGI app on a real socket, and raw HTTP I/O."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Self, TypeVar

from tests.servers import ThreadedServer

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ScriptedAnswer:
    """What one request gets instead of the normal answer: a wait before its first byte, then,
    when `status` is set, that answer: `body` as JSON, or as it is when bytes (None: the fake's
    own error shape)."""

    status: int | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0


class FakeUpstream:
    """A fake provider's life cycle: `_app` served by uvicorn on 127.0.0.1 at a free port, in a
    daemon thread. Subclasses set `api_root` (the path clients put after the host)."""

    api_root = "/v1"
    _server: ThreadedServer | None = None

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget recorded calls and whatever was scripted, for the next test."""
        raise NotImplementedError

    def start(self) -> Self:
        """Serve on a free port; returns once connections are accepted."""
        if self._server is not None:
            raise RuntimeError("the fake is already running")
        self._server = ThreadedServer(self._app).start()
        return self

    def stop(self) -> None:
        """Shut the server down and wait for its thread; a no-op when not running."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>` + `api_root`: what a client's base URL is set to."""
        if self._server is None:
            raise RuntimeError("the fake is not running; call start() first")
        return f"{self._server.url}{self.api_root}"


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, however many ASGI messages it came in; None if the client left."""
    raw = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        raw += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(raw)


async def send_json(
    send: Send,
    status: int,
    payload: Any,
    headers: Mapping[str, str] | None = None,
    *,
    default_headers: Mapping[str, str] | None = None,
) -> None:
    """One complete JSON response: `payload` encoded, or sent as it is when bytes (what
    json.dumps cannot write). `headers` (e.g. scripted ones) override `default_headers`."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    merged = {
        "content-type": "application/json",
        **{name.lower(): value for name, value in (default_headers or {}).items()},
        **{name.lower(): value for name, value in (headers or {}).items()},
        "content-length": str(len(raw)),
    }
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(name.encode(), value.encode()) for name, value in merged.items()],
        }
    )
    await send({"type": "http.response.body", "body": raw, "more_body": False})


Answer = TypeVar("Answer", bound=ScriptedAnswer)


class ScriptedFaults(Generic[Answer]):
    """The faults a fake upstream can be scripted with before its first byte (`fail_next`,
    `delay_next`), queued and consumed one per request, in order, whatever the request is.

    The fake's app runs on the server thread's loop while tests script from the main thread:
    the queue is only touched under `_lock`. A subclass whose queue holds more than these (the
    OpenAI-style fake's stream faults) sets `_answer_type` to its own ScriptedAnswer.
    """

    _answer_type: Callable[..., Answer]

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[Answer] = deque()

    def fail_next(
        self,
        status: int,
        *,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` requests get `status` with `body` (the provider's own error shape
        when None) and the extra `headers`, e.g. `fail_next(429, headers={"Retry-After":
        "1"})`."""
        answer = self._answer_type(status=status, body=body, headers=dict(headers or {}))
        with self._lock:
            self._script.extend([answer] * times)

    def answer_next(self, body: Any, *, status: int = 200) -> None:
        """The next request gets `body` as its answer, whatever it asked: a JSON value, or
        bytes sent as they are (an answer json.dumps cannot write, such as one nested too
        deep), e.g. `answer_next({"choices": 5})`, `answer_next(b"[" * 100_000)`."""
        with self._lock:
            self._script.append(self._answer_type(status=status, body=body))

    def delay_next(self, seconds: float) -> None:
        """The next request waits `seconds` before the first byte of its (normal) answer."""
        with self._lock:
            self._script.append(self._answer_type(delay_seconds=seconds))

    def _next_scripted(self) -> Answer | None:
        with self._lock:
            return self._script.popleft() if self._script else None

    async def _answered_as_scripted(
        self, send: Send, scripted: Answer | None, *, extra_delay: float = 0.0
    ) -> bool:
        """Wait as `scripted` says, then answer its error if it has one: True when it did."""
        delay = (scripted.delay_seconds if scripted else 0.0) + extra_delay
        if delay > 0:
            await asyncio.sleep(delay)
        if scripted is None or scripted.status is None:
            return False
        body = scripted.body
        if body is None:
            body = self._error_body_for(scripted.status)
        await self._send_json(send, scripted.status, body, scripted.headers)
        return True

    def _error_body_for(self, status: int) -> dict[str, Any]:
        """The provider's own error body for a scripted `status`."""
        raise NotImplementedError

    async def _send_json(
        self, send: Send, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> None:
        raise NotImplementedError
