"""Log lines that name their request: a request id in a context variable, put on every record.

The gateway's endpoint wrapper binds the id it answers with (`x-request-id`); the pages get
theirs from `request_id_middleware`. Context variables follow the request into the threads
Django runs sync code in (asgiref copies them) and into the tasks a stream spawns, so every
line a request causes carries its id. `LOG_FORMAT=json` writes one JSON object a line.

What never goes into a log line: API keys, provider secrets, request or response bodies.
The code logs ids, names and exception types only; this module adds nothing else.
"""

from __future__ import annotations

import json
import logging
import logging.config
import re
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils.decorators import sync_and_async_middleware

_request_id: ContextVar[str] = ContextVar("request_id", default="")
# The shape of every request id this module and the gateway hand out (`new_request_id`).
REQUEST_ID_PATTERN = re.compile(r"req_[0-9a-f]{32}")


def new_request_id() -> str:
    """The id a request is known by: in its answer's headers, its log lines and its usage."""
    return f"req_{uuid.uuid4().hex}"


def bind_request_id(request_id: str) -> None:
    """Name the current request in every log line from here on (this task and its children)."""
    _request_id.set(request_id)


def current_request_id() -> str:
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (empty outside a request) for the formatters to use."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id, and
    the traceback as `exc` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "") or _request_id.get(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(config: dict[str, Any]) -> None:
    """Apply settings.LOGGING (Django's LOGGING_CONFIG), leaving uvicorn's access log as its
    command line set it.

    uvicorn configures its loggers before Django starts, and writes an access line for every
    request whenever its access logger has a handler. Under `--no-access-log` it leaves that
    logger without one; LOGGING's handler for it (which puts the lines in our format) would
    bring them back, one a request at ~30 µs of the gateway's CPU each. So the handler is
    given only where uvicorn left one of its own."""
    if not logging.getLogger("uvicorn.access").handlers:
        loggers = {**config.get("loggers", {})}
        loggers["uvicorn.access"] = {"handlers": [], "propagate": False}
        config = {**config, "loggers": loggers}
    logging.config.dictConfig(config)


_GetResponse = Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]


@sync_and_async_middleware
def request_id_middleware(get_response: _GetResponse) -> _GetResponse:
    """Give each page request an id, bind it for the logs and answer it as `x-request-id`."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> HttpResponseBase:
            request_id = new_request_id()
            bind_request_id(request_id)
            response = await get_response(request)
            response["x-request-id"] = request_id
            return response

        return async_middleware

    def middleware(request: HttpRequest) -> HttpResponseBase:
        request_id = new_request_id()
        bind_request_id(request_id)
        response = get_response(request)
        assert isinstance(response, HttpResponseBase)  # noqa: S101 (the sync chain)
        response["x-request-id"] = request_id
        return response

    return middleware
