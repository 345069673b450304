"""The floor: a bare ASGI proxy (uvicorn + one pooled aiohttp session), no auth, no metering.

It forwards `POST /v1/chat/completions` to BENCH_UPSTREAM_URL and relays the answer (streams
chunk by chunk). Whatever Switchboard costs above this is the price of what it does.

    BENCH_UPSTREAM_URL=http://127.0.0.1:9100 uvicorn bench.bareproxy:app
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

_UPSTREAM = os.environ.get("BENCH_UPSTREAM_URL", "http://127.0.0.1:9100")
_session: aiohttp.ClientSession | None = None


def _client() -> aiohttp.ClientSession:
    global _session
    if _session is None:
        _session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1000))
    return _session


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    async with _client().post(
        _UPSTREAM + scope["path"], data=body, headers={"Content-Type": "application/json"}
    ) as upstream:
        headers = [(b"content-type", upstream.headers["Content-Type"].encode())]
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        async for piece in upstream.content.iter_any():
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
