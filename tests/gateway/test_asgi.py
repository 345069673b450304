"""The gateway's own ASGI handler (gateway/asgi.py), end to end over real HTTP: how it reads the
body (size cap included), finds the view, answers a view's failure, and what a client that
hangs up during a whole answer is charged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.http import JsonResponse, StreamingHttpResponse

from billing.models import Reservation, UsageRecord
from billing.selectors import wallet_balance_usd
from gateway import asgi_urls
from gateway.asgi import GatewayASGIHandler
from gateway.errors import (
    STREAM_FAILED,
    GatewayError,
    anthropic_stream_error_event,
    stream_error_event,
)
from gateway.wire import JsonAnswer, RequestHeaders
from tests.factories import make_key, make_org
from tests.gateway.test_streaming import MESSAGES, wait_for

# The smallest cap the settings accept.
CAP = 1024


@pytest.fixture
def small_cap(settings):
    settings.GATEWAY_MAX_BODY_BYTES = CAP


def _oversized_chat() -> bytes:
    message = {"role": "user", "content": "x" * (CAP + 100)}
    return json.dumps({"model": "fake-small", "messages": [message]}).encode()


def _in_parts(body: bytes, size: int = 100) -> Iterator[bytes]:
    """The body as a generator: httpx sends it chunked, with no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_a_body_over_the_cap_gets_413_in_openai_shape(gateway_url, catalog, small_cap):
    _, key = make_key(make_org())

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=_oversized_chat(),
    )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["x-request-id"].startswith("req_")


def test_a_chunked_body_over_the_cap_gets_413_without_a_declared_length(
    gateway_url, catalog, small_cap
):
    _, key = make_key(make_org())

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=_in_parts(_oversized_chat()),
    )

    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert UsageRecord.objects.count() == 0


def test_a_body_over_the_cap_gets_anthropics_shape_on_messages(gateway_url, catalog, small_cap):
    _, key = make_key(make_org())

    response = httpx.post(
        f"{gateway_url}/messages",
        headers={"x-api-key": key, "Content-Type": "application/json"},
        content=_oversized_chat(),
    )

    assert response.status_code == 413
    assert response.json() == {
        "type": "error",
        "error": {
            "type": "request_too_large",
            "message": f"The request body exceeds {CAP} bytes.",
        },
    }


def test_a_body_sent_in_parts_is_read_whole(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org())
    body = httpx.Request("POST", "/", json={"model": "fake-small", "messages": MESSAGES}).content

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        content=_in_parts(body, size=7),
    )

    assert response.status_code == 200
    assert fake_provider.calls[0].json["messages"] == MESSAGES


def test_a_model_id_may_hold_slashes(gateway_url, catalog):
    _, key = make_key(make_org())

    response = httpx.get(
        f"{gateway_url}/models/acme/fake-small", headers={"Authorization": f"Bearer {key}"}
    )

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "'acme/fake-small'" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/models/", "/chat/completions/", "/", ""])
def test_a_path_no_view_serves_gets_openais_404(gateway_url, path):
    response = httpx.get(f"{gateway_url}{path}")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_endpoint"


@pytest.mark.parametrize("path", ["/messages/", "/messages/count_tokens", "/messages/batches"])
def test_a_path_under_messages_no_view_serves_gets_anthropics_404(gateway_url, path):
    # The anthropic SDK calls these (count_tokens, batches); it reads Anthropic's shape.
    response = httpx.post(f"{gateway_url}{path}", json={})

    assert response.status_code == 404
    assert response.json()["type"] == "error"
    assert response.json()["error"]["type"] == "not_found_error"
    assert response.headers["x-request-id"].startswith("req_")


def test_a_wrong_method_on_messages_gets_anthropics_405(gateway_url):
    response = httpx.get(f"{gateway_url}/messages")

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["type"] == "error"


async def _failing_view(request, **kwargs):
    raise RuntimeError("a bug with a secret sk-upstream-0123 in its message")


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic")],
)
def test_a_failure_that_escapes_a_view_gets_a_500_in_the_apis_shape(
    gateway_url, monkeypatch, path, shape
):
    # No view fails this way on purpose: one that does stands in for a bug.
    monkeypatch.setitem(asgi_urls.EXACT_PATHS, path, _failing_view)

    response = httpx.post(gateway_url.removesuffix("/v1") + path, json={})

    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert "sk-upstream" not in response.text
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert error["type"] == "api_error"
    assert (shape == "anthropic") == (response.json().get("type") == "error")


async def _stream_failing_after_its_first_event(request, **kwargs):
    async def events():
        yield b'data: {"first": true}\n\n'
        raise RuntimeError("a bug with a secret sk-upstream-0123 in its message")

    return StreamingHttpResponse(events(), content_type="text/event-stream")


@pytest.mark.parametrize(
    ("path", "error_event"),
    [
        ("/v1/chat/completions", stream_error_event(GatewayError(STREAM_FAILED))),
        ("/v1/messages", anthropic_stream_error_event(GatewayError(STREAM_FAILED))),
    ],
)
def test_a_stream_that_fails_after_its_first_event_ends_with_the_apis_error_event(
    gateway_url, monkeypatch, path, error_event
):
    # Past the 200, a failure is told as the stream's last event, in the API's shape, and the
    # stream ends cleanly, rather than a connection cut mid-body. No view fails this way on
    # purpose: one that does stands in for a bug.
    monkeypatch.setitem(asgi_urls.EXACT_PATHS, path, _stream_failing_after_its_first_event)

    response = httpx.post(gateway_url.removesuffix("/v1") + path, json={})

    assert response.status_code == 200
    assert response.content == b'data: {"first": true}\n\n' + error_event
    assert b"sk-upstream" not in response.content


def test_a_client_that_hangs_up_before_a_whole_answer_is_charged_for_the_upstream_call(
    gateway_url, catalog, fake_provider
):
    org, other = make_org(credit_usd="10"), make_org(credit_usd="10")
    _, key = make_key(org)
    make_key(other)
    # The provider answers after the client has given up: the upstream call still runs to its
    # end (the provider charges for it), so the caller is charged, not the gateway.
    fake_provider.latency = 3.0

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway_url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "fake-small", "messages": MESSAGES},
            timeout=httpx.Timeout(10, read=1.0),
        )

    wait_for(
        lambda: (
            UsageRecord.objects.exists()
            and not Reservation.objects.filter(state=Reservation.State.HELD).exists()
        ),
        what="the whole answer to be settled",
    )
    record = UsageRecord.objects.get()
    assert record.status == UsageRecord.Status.OK
    assert record.organization_id == org.pk
    assert record.cost_usd > 0
    assert wallet_balance_usd(organization_id=org.pk) == 10 - record.cost_usd
    assert wallet_balance_usd(organization_id=other.pk) == 10


def test_request_headers_are_found_by_any_case_and_repeats_are_joined():
    headers = RequestHeaders(
        [(b"authorization", b"Bearer a"), (b"x-tag", b"one"), (b"X-Tag", b"two")]
    )

    assert headers["Authorization"] == "Bearer a"
    assert headers.get("X-TAG") == "one,two"
    assert headers.get("x-api-key", "") == ""
    assert "AUTHORIZATION" in headers


def test_a_json_answer_says_what_djangos_json_response_says():
    # Compact and UTF-8 (orjson: gateway/wire.py), where Django's has spaces and \u escapes.
    data = {"price": Decimal("1.50"), "text": "café", "items": [1, 2.5, None, True]}

    assert json.loads(JsonAnswer(data).content) == json.loads(JsonResponse(data).content)


def test_the_handler_itself_leaves_the_body_out_of_an_answer_to_head():
    # uvicorn drops a HEAD answer's body by itself; the handler must not count on its server.
    scope = {"type": "http", "method": "HEAD", "path": "/v1/models", "headers": []}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(GatewayASGIHandler()(scope, receive, send))

    start, body = sent
    assert start["status"] == 401  # no key: refused before any lookup
    assert int(dict(start["headers"])[b"content-length"]) > 0
    assert body["body"] == b""
