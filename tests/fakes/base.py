"""What the fake upstreams share: serving their ASGI app on a real socket, and raw HTTP I/O."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Self

from tests.servers import ThreadedServer

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class FakeUpstream:
    """A fake provider's life cycle: `_app` served by uvicorn on 127.0.0.1 at a free port, in a
    daemon thread. Subclasses set `api_root` (the path clients put after the host)."""

    api_root = "/v1"
    _server: ThreadedServer | None = None

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
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
    """One complete JSON response. `headers` (e.g. scripted ones) override `default_headers`."""
    raw = json.dumps(payload).encode()
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
