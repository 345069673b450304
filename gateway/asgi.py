"""The gateway's own ASGI handler for `/v1/*`: Django's request, URL resolution and views,
without the per-request machinery the request path does not need.

Django's handler (a) runs its middleware stack, which includes sync-only middleware
(WhiteNoise): a single sync middleware makes Django run the whole request, async view
included, through a thread; (b) gives every request a thread of its own for sync code
(ThreadSensitiveContext), started and stopped per request; (c) sends the request-started and
-finished signals through that thread, whose receivers take and give back a database
connection. `/v1/*` needs no middleware (no sessions, CSRF, messages or static files), and its
database calls run in the gateway's own threads, which give their connection back after each
call (gateway/database.py). Profiled (issue 7, bench/RESULTS.md), (a) to (c) were most of the
handler's CPU per request.

URLs resolve against the gateway's own URLconf (gateway/asgi_urls.py), not the site's.

What stays Django's: the request object, URL resolution, the view's exception handling (a
500 in OpenAI's shape from the view's own wrapper, Django's otherwise), the response, and the
watch for a client that disconnects (it cancels the view, so a stream's hold is settled or
released, never left).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.http import HttpResponse

_URLCONF = "gateway.asgi_urls"


class GatewayASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        """Build the handler chain with no middleware at all."""
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        get_response = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        self._middleware_chain = convert_exception_to_response(get_response)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # No ThreadSensitiveContext: nothing on this path runs sync code in the request's thread.
        await self.handle(scope, receive, send)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Django's ASGIHandler.handle without the request signals (see the module's
        docstring); the rest, the disconnect watch included, is Django's."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        request, error_response = self.create_request(scope, body_file)
        if request is None or error_response is not None:
            body_file.close()
            assert error_response is not None  # noqa: S101 (Django returns one or the other)
            await self.send_response(error_response, send)
            error_response.close()
            return
        request.urlconf = _URLCONF  # type: ignore[attr-defined]  # (Django reads it per request)

        async def process_request() -> Any:
            response = await self.run_get_response(request)
            if isinstance(response, HttpResponse) and not response.has_header("Content-Length"):
                # What CommonMiddleware does on Django's path: a whole answer goes out with its
                # length, in one body frame, not chunked.
                response.headers["Content-Length"] = str(len(response.content))
            # The client may go away while the answer is being sent.
            with contextlib.suppress(asyncio.CancelledError):
                await self.send_response(response, send)
            return response

        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                # The view sees the cancellation (a stream settles what it relayed).
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if not tasks[1].cancelled():
            # Closes what the response holds; the finished signal's receivers find no
            # connection in this thread (the database threads gave theirs back).
            tasks[1].result().close()
        body_file.close()
