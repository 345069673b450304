"""The gateway's own ASGI handler for `/v1/*` (and the probes and metrics page): the request
path without Django's per-request machinery.

Django's handler runs its middleware stack (ten middlewares; until WhiteNoise gave way to
ServeStatic, one sync middleware ran the whole request through a thread), gives every request
a thread of its own, sends the request signals, spools the body through a temporary file,
builds META from every header, resolves the URL with the URLconf set in an asgiref Local, and
runs two tasks per request (the view, and a watch for the client going away). `/v1/*` needs
none of it: no sessions, CSRF, messages or static files; its database calls run on the event
loop's own connections or in the gateway's database threads (gateway/database.py). Measured
(issue 7, bench/RESULTS.md): even without the middleware, the threads and the signals, Django's
request, URL resolution and response were about 15% of the gateway's CPU samples at c=64, and
its handler 300 µs of CPU for a probe's answer in-process (this one: 35 µs); every 4xx cost a
thread hop more (Django logs it through `sync_to_async`).

Here: the body is read from ASGI into bytes (up to GATEWAY_MAX_BODY_BYTES); the view gets a
`GatewayRequest` (gateway/wire.py), found by path in gateway/asgi_urls.py; its answer goes
straight to ASGI, a whole answer with its Content-Length in one body frame. A request runs in
the server's own task. Only a stream gets a second task, the watch for a client that hangs up:
it cancels the stream, so the relay settles what was generated and closes the upstream (a
whole answer runs to its end, so a request whose upstream call was made is charged for it).
An exception that escapes a view is logged and answered with a 500 (503 when the database is
down) in the API's error shape, never with a traceback or Django's HTML page. A CORS preflight
on `/v1/*` is answered here, before the body is read, and every `/v1/*` answer carries the CORS
headers (gateway/cors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Any, cast

from django.conf import settings
from django.http import StreamingHttpResponse
from django.http.response import HttpResponseBase

from gateway import capacity, cors
from gateway.asgi_urls import view_for
from gateway.errors import STREAM_FAILED, GatewayError, error_answer_on, stream_error_event_on
from gateway.wire import Answer, GatewayRequest, JsonAnswer, asgi_headers

logger = logging.getLogger(__name__)

_ASGISend = Any
_ASGIReceive = Any


class GatewayASGIHandler:
    """One instance per process (portal/asgi.py); an ASGI 3 application."""

    async def __call__(self, scope: dict[str, Any], receive: _ASGIReceive, send: _ASGISend) -> None:
        if scope["type"] != "http":
            raise ValueError(f"The gateway serves HTTP only, not {scope['type']}.")
        # /v1/* answers carry the CORS headers; the probes and the metrics page do not.
        api = scope["path"].startswith("/v1")
        cors_headers = cors.answer_headers(scope) if api else ()
        if api and scope["method"] == "OPTIONS":
            preflight = cors.preflight_headers(scope)
            if preflight is not None:
                await send({"type": "http.response.start", "status": 204, "headers": preflight})
                await send({"type": "http.response.body", "body": b""})
                return
        body = await _read_body(receive, limit=settings.GATEWAY_MAX_BODY_BYTES)
        if body is _HUNG_UP:
            return
        request = GatewayRequest(scope, body if isinstance(body, bytes) else None)
        view, kwargs = view_for(request.path)
        try:
            answer = await view(request, **kwargs)
        except Exception as exc:
            # The /v1 views answer their own failures (gateway/views.py); this is the last
            # resort for a bug there or in a probe.
            logger.exception("%s %s failed", request.method, request.path)
            answer = _failure_answer(exc, path=request.path)
        if isinstance(answer, StreamingHttpResponse):
            await _send_stream(answer, receive, send, cors_headers, path=request.path)
        else:
            await _send_whole(answer, send, cors_headers, head=request.method == "HEAD")


class _HungUp:
    """The client went away before its body arrived."""


_HUNG_UP = _HungUp()


async def _read_body(receive: _ASGIReceive, *, limit: int) -> bytes | _HungUp | None:
    """The request's body as bytes; None when it went past `limit` bytes (the rest is left
    unread: the answer is a 413); _HUNG_UP when the client went away first."""
    message = await receive()
    if message["type"] == "http.disconnect":
        return _HUNG_UP
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: the body in one message
        return body if len(body) <= limit else None
    parts = [body]
    size = len(body)
    while True:
        if size > limit:
            return None
        message = await receive()
        if message["type"] == "http.disconnect":
            return _HUNG_UP
        part = message.get("body", b"")
        parts.append(part)
        size += len(part)
        if not message.get("more_body", False):
            return b"".join(parts) if size <= limit else None


def _failure_answer(exc: Exception, *, path: str) -> JsonAnswer:
    return error_answer_on(capacity.unexpected_failure(exc), path=path)


async def _send_whole(
    answer: Answer, send: _ASGISend, cors_headers: cors.Headers, *, head: bool
) -> None:
    """A whole answer, with its Content-Length, in one body frame (none for a HEAD)."""
    if isinstance(answer, JsonAnswer):
        await answer.send_to(send, cors_headers, head=head)
        return
    # Django's HttpResponse, from the probes and the metrics page
    body = answer.content  # type: ignore[attr-defined]
    if not answer.has_header("Content-Length"):
        answer.headers["Content-Length"] = str(len(body))
    headers = _cookies_added(answer, asgi_headers(answer.items()))
    headers.extend(cors_headers)
    await send({"type": "http.response.start", "status": answer.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


def _cookies_added(
    response: HttpResponseBase, headers: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    for cookie in response.cookies.values():
        headers.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
    return headers


class _HangUpWatch:
    """Waits for the client to go away during a stream, and then cancels the stream's task."""

    def __init__(self, receive: _ASGIReceive, streaming: asyncio.Task[Any]) -> None:
        self.receive = receive
        self.streaming = streaming
        self.relaying = True  # False once the last event is out: nothing to cancel then
        self.hung_up = False

    async def watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if self.relaying:
                    self.hung_up = True
                    self.streaming.cancel()
                return


async def _send_stream(
    response: StreamingHttpResponse,
    receive: _ASGIReceive,
    send: _ASGISend,
    cors_headers: cors.Headers,
    *,
    path: str,
) -> None:
    """A stream, event by event as the relay yields them; cancelled if the client hangs up,
    so the relay (gateway/streaming.py) settles what it relayed and closes the upstream. A
    failure in writing the events (an API's encoder, after its status went out) ends the
    stream with an error event in the API's shape, once the relay has settled."""
    headers = _cookies_added(response, asgi_headers(response.items()))
    headers.extend(cors_headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    task = asyncio.current_task()
    assert task is not None  # noqa: S101 (an ASGI app runs in a task)
    hang_up = _HangUpWatch(receive, task)
    watching = asyncio.create_task(hang_up.watch())
    try:
        async with contextlib.aclosing(cast(AsyncGenerator[bytes], aiter(response))) as content:
            async for part in content:
                await send({"type": "http.response.body", "body": part, "more_body": True})
        # No await between the last event and this: a hang-up from here on cancels nothing
        # (the watch's cancellation can only land at an await above).
        hang_up.relaying = False
    except asyncio.CancelledError:
        if not hang_up.hung_up:
            raise  # the server is stopping
        # The relay saw the cancellation and settled; the request ends here.
        task.uncancel()
        return
    except Exception:
        # Closing the events (aclosing, above) closed the relay, which settled what went out.
        hang_up.relaying = False
        logger.exception("writing the stream of %s failed", path)
        failure = GatewayError(STREAM_FAILED)
        last = stream_error_event_on(failure, path=path)
        await send({"type": "http.response.body", "body": last, "more_body": True})
    finally:
        watching.cancel()
    await send({"type": "http.response.body", "body": b"", "more_body": False})
