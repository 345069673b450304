"""What a `/v1/*` view reads and answers, as the gateway's ASGI handler (gateway/asgi.py) passes
them: a request and a JSON answer of the gateway's own, lighter than Django's.

Django's `ASGIRequest` copies every header into META and spools the body through a temporary
file; its `JsonResponse` validates each header through a case-insensitive mapping and sends a
request-finished signal when closed. Measured (issue 7, bench/RESULTS.md): a chat completion's
JsonResponse, built and its headers encoded, 84 µs; a JsonAnswer 11 µs. A view reads
`request.method`, `.path`, `.headers` (case-insensitive, built on first use), `.body` and
`.scope` (the client's address: gateway/auth.py's `client_host_of`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson
from django.core.exceptions import RequestDataTooBig
from django.core.serializers.json import DjangoJSONEncoder
from django.http.response import HttpResponseBase


class RequestHeaders(Mapping[str, str]):
    """The request's headers by case-insensitive name; a repeated header's values joined by
    commas, as Django joins them. Decoded on first use: most requests read one or two."""

    __slots__ = ("_by_name", "_raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._by_name: dict[str, str] | None = None

    def _names(self) -> dict[str, str]:
        if self._by_name is None:
            by_name: dict[str, str] = {}
            for raw_name, raw_value in self._raw:
                name = raw_name.decode("latin-1").lower()
                value = raw_value.decode("latin-1")
                by_name[name] = f"{by_name[name]},{value}" if name in by_name else value
            self._by_name = by_name
        return self._by_name

    def __getitem__(self, name: str) -> str:
        return self._names()[name.lower()]

    def get(self, name: str, default: Any = None) -> Any:
        return self._names().get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


class GatewayRequest:
    """One `/v1/*` request: its ASGI scope and its body, read whole before the view runs.

    `body` is None when the body went past GATEWAY_MAX_BODY_BYTES (it was not kept); reading
    it then raises RequestDataTooBig, as Django's request does, and gateway/requests.py answers
    413.
    """

    __slots__ = ("_body", "_headers", "method", "path", "scope")

    def __init__(self, scope: dict[str, Any], body: bytes | None) -> None:
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self._body = body
        self._headers: RequestHeaders | None = None

    @property
    def headers(self) -> RequestHeaders:
        if self._headers is None:
            self._headers = RequestHeaders(self.scope["headers"])
        return self._headers

    @property
    def body(self) -> bytes:
        if self._body is None:
            raise RequestDataTooBig("The request body exceeds the gateway's size cap.")
        return self._body


# Decimals, datetimes and lazy strings written as DjangoJSONEncoder writes them.
_DJANGO_DEFAULT = DjangoJSONEncoder().default
# For what orjson refuses; one encoder for the process, not one per answer.
_ENCODER = json.JSONEncoder(default=_DJANGO_DEFAULT)


def json_bytes(data: Any) -> bytes:
    """`data` as compact UTF-8 JSON, by orjson: the gateway's answers and its requests to
    providers. A chat completion in 0.55 µs, against 6.1 µs with json's encoder (1.4% of
    the gateway's samples at c=64). What orjson refuses
    goes through json's encoder instead: a lone surrogate (a provider's answer may hold one:
    providers/http.py reads answers leniently), an integer past 64 bits, a key that is not a
    string. orjson writes NaN and infinities as null (JSON has no NaN; json's encoder, in the
    fallback, writes NaN as Python's json always did)."""
    try:
        return orjson.dumps(data, default=_DJANGO_DEFAULT, option=orjson.OPT_PASSTHROUGH_DATETIME)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(data).encode()


# The request's charge in USD, on every answer that is not a stream (a stream's charge is
# known only at its end: its usage record has it).
COST_HEADER = "x-switchboard-cost-usd"


class JsonAnswer:
    """A whole JSON answer: status, headers (set more with `answer[name] = value`) and the
    encoded body, sent by the handler with its Content-Length in one body frame."""

    __slots__ = ("content", "headers", "status_code")
    streaming = False

    def __init__(
        self, data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        self.status_code = status
        self.headers: dict[str, str] = dict(headers) if headers else {}
        self.content = json_bytes(data)

    def __setitem__(self, name: str, value: str) -> None:
        self.headers[name] = value

    async def send_to(
        self, send: Any, extra_headers: Iterable[tuple[bytes, bytes]] = (), *, head: bool = False
    ) -> None:
        """Send this answer on an ASGI `send`: its Content-Length, one body frame;
        `extra_headers` (the CORS headers: gateway/cors.py) as they are. The answer to a HEAD
        (`head`) has the same headers, Content-Length included, and no body (RFC 9110)."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.content)).encode()),
            *asgi_headers(self.headers.items()),
            *extra_headers,
        ]
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else self.content})


def asgi_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Headers as ASGI sends them (HTTP header values are Latin-1)."""
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


# What a view answers: a JsonAnswer, or one of Django's responses (a stream, the probes').
Answer = JsonAnswer | HttpResponseBase
