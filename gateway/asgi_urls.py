"""The paths the gateway's own handler (gateway/asgi.py) serves: `/v1/*`, the probes and the
metrics page (portal/asgi.py sends it those), looked up in a dict, not resolved by Django.

Django's URL resolution set the URLconf in an asgiref Local per request and matched patterns
one by one; a dict lookup is all these paths need. The one pattern is `/v1/models/<id>` (the
id may hold slashes, as Django's `path` converter allowed). Every other `/v1/*` path gets
OpenAI's 404, and Anthropic's under `/v1/messages/`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async

from gateway import messages_view, views
from gateway.metrics import metrics_view
from portal import health

View = Callable[..., Any]  # async: (request, **kwargs) -> an answer

EXACT_PATHS: dict[str, View] = {
    "/v1/chat/completions": views.chat_completions,
    "/v1/completions": views.completions,
    "/v1/embeddings": views.embeddings,
    "/v1/messages": messages_view.messages,
    "/v1/models": views.models,
    "/healthz": health.healthz,
    "/readyz": health.readyz,
    # The metrics page reads the database synchronously: in a thread, as Django would run it.
    "/metrics": sync_to_async(metrics_view, thread_sensitive=True),
}
MODEL_PREFIX = "/v1/models/"
MESSAGES_PREFIX = "/v1/messages/"


def view_for(path: str) -> tuple[View, dict[str, str]]:
    """The view that serves `path`, and its keyword arguments."""
    view = EXACT_PATHS.get(path)
    if view is not None:
        return view, {}
    if path.startswith(MODEL_PREFIX) and len(path) > len(MODEL_PREFIX):
        return views.model, {"model_id": path[len(MODEL_PREFIX) :]}
    if path.startswith(MESSAGES_PREFIX):  # Anthropic's API: its SDKs read its error shape
        return messages_view.unknown_endpoint, {}
    return views.unknown_endpoint, {}
