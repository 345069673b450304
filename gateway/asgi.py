"""The gateway's own ASGI handler: Django without its middleware, for `/v1/*`.

The dashboard's middleware stack includes sync-only middleware (WhiteNoise); a single sync
middleware makes Django run the whole request, async view included, through one thread per
process, so requests would queue behind each other. `/v1/*` needs none of it (no sessions,
CSRF, messages or static files), so portal.asgi sends those paths here, where the view runs
on the event loop directly. URL resolution, settings and request signals are Django's.
"""

from __future__ import annotations

from typing import Any

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response


class GatewayASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        """Build the handler chain with no middleware at all."""
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        get_response = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        self._middleware_chain = convert_exception_to_response(get_response)
