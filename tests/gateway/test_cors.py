"""CORS on /v1/* (gateway/cors.py), over real HTTP: preflights answered as a browser sends them,
and every kind of answer (whole, streamed, refused, at capacity) readable from another origin;
the allowed origins are the GATEWAY_CORS_ALLOWED_ORIGINS setting."""

from __future__ import annotations

import threading
import time
from decimal import Decimal
from typing import Any

import httpx
import pytest
from django.core.exceptions import ImproperlyConfigured
from playwright.sync_api import sync_playwright

from billing.models import UsageRecord
from portal.settings import env_origins
from tests.factories import make_key, make_org
from tests.gateway.test_streaming import MESSAGES
from tests.servers import ThreadedServer
from tests.test_browser_flow import CHROMIUM

PAGE = "https://app.example.com"
# What Chromium sends before the openai SDK's POST from a page (`dangerouslyAllowBrowser`).
OPENAI_SDK_HEADERS = (
    "authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,"
    "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,"
    "x-stainless-runtime-version,x-stainless-timeout"
)
ANTHROPIC_SDK_HEADERS = (
    "anthropic-dangerous-direct-browser-access,anthropic-version,content-type,x-api-key,"
    "x-stainless-lang"
)


def preflight(url: str, *, requested_headers: str | None, origin: str = PAGE) -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if requested_headers is not None:
        headers["Access-Control-Request-Headers"] = requested_headers
    return httpx.options(url, headers=headers)


def assert_readable_from_a_page(response: httpx.Response, origin: str = "*") -> None:
    """The headers a browser needs to hand the answer, and the ones a client reads, to a page."""
    assert response.headers["access-control-allow-origin"] == origin
    exposed = {
        name.strip() for name in response.headers["access-control-expose-headers"].split(",")
    }
    assert {"x-request-id", "request-id", "x-switchboard-cost-usd", "retry-after"} <= exposed
    assert "access-control-allow-credentials" not in response.headers


@pytest.mark.parametrize(
    ("path", "requested"),
    [
        ("/chat/completions", OPENAI_SDK_HEADERS),
        ("/messages", ANTHROPIC_SDK_HEADERS),
        ("/models/fake-small", "authorization"),
        ("/no/such/endpoint", "authorization"),
    ],
)
def test_a_preflight_on_any_v1_path_answers_204_allowing_the_headers_asked_for(
    gateway_url, path, requested
):
    response = preflight(f"{gateway_url}{path}", requested_headers=requested)

    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["access-control-allow-headers"] == requested
    methods = {
        method.strip() for method in response.headers["access-control-allow-methods"].split(",")
    }
    assert {"GET", "POST"} <= methods
    assert int(response.headers["access-control-max-age"]) >= 600
    assert "access-control-allow-credentials" not in response.headers
    assert UsageRecord.objects.count() == 0


def test_an_options_that_is_no_preflight_still_gets_405_with_allow(gateway_url):
    response = httpx.options(f"{gateway_url}/chat/completions", headers={"Origin": PAGE})

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_a_whole_answer_is_readable_from_a_page(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org(credit_usd="10"))

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Origin": PAGE},
        json={"model": "fake-small", "messages": MESSAGES},
    )

    assert response.status_code == 200
    assert_readable_from_a_page(response)


def test_a_stream_is_readable_from_a_page(gateway_url, catalog, fake_provider):
    _, key = make_key(make_org(credit_usd="10"))

    with httpx.stream(
        "POST",
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Origin": PAGE},
        json={"model": "fake-small", "messages": MESSAGES, "stream": True},
    ) as response:
        body = response.read()

    assert response.status_code == 200
    assert body.endswith(b"data: [DONE]\n\n")
    assert_readable_from_a_page(response)


@pytest.mark.parametrize("path", ["/chat/completions", "/messages", "/nowhere"])
def test_a_refusal_is_readable_from_a_page(gateway_url, catalog, path):
    response = httpx.post(f"{gateway_url}{path}", headers={"Origin": PAGE}, json={})

    assert response.status_code in (401, 404)
    assert_readable_from_a_page(response)


def test_a_process_at_capacity_is_readable_from_a_page(
    gateway_url, catalog, fake_provider, settings
):
    settings.GATEWAY_MAX_REQUESTS_PER_PROCESS = 1
    _, key = make_key(make_org(credit_usd="10"))
    fake_provider.delay_next(1)
    request = {"model": "fake-small", "messages": MESSAGES}
    slow = threading.Thread(
        target=httpx.post,
        args=(f"{gateway_url}/chat/completions",),
        kwargs={"headers": {"Authorization": f"Bearer {key}"}, "json": request},
    )
    slow.start()
    deadline = time.monotonic() + 10
    while not fake_provider.calls:  # the first request holds the only slot
        assert time.monotonic() < deadline
        time.sleep(0.01)

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}", "Origin": PAGE},
        json=request,
    )

    slow.join(10)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert_readable_from_a_page(response)


def test_the_probes_carry_no_cors_headers(gateway_url):
    response = httpx.get(gateway_url.removesuffix("/v1") + "/healthz", headers={"Origin": PAGE})

    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_listed_origins_are_named_and_others_are_not(gateway_url, settings):
    settings.GATEWAY_CORS_ALLOWED_ORIGINS = (PAGE, "http://localhost:3000")
    url = f"{gateway_url}/models"

    listed = httpx.get(url, headers={"Origin": PAGE})
    other = httpx.get(url, headers={"Origin": "https://evil.example"})
    listed_preflight = preflight(url, requested_headers="authorization")
    other_preflight = preflight(
        url, requested_headers="authorization", origin="https://evil.example"
    )

    assert listed.status_code == other.status_code == 401
    assert_readable_from_a_page(listed, origin=PAGE)
    assert "origin" in listed.headers["vary"].lower()
    assert "access-control-allow-origin" not in other.headers
    assert "origin" in other.headers["vary"].lower()
    assert listed_preflight.status_code == 204
    assert listed_preflight.headers["access-control-allow-origin"] == PAGE
    assert "access-control-allow-origin" not in other_preflight.headers


def test_no_origins_turns_cors_off(gateway_url, settings):
    settings.GATEWAY_CORS_ALLOWED_ORIGINS = ()

    answer = httpx.get(f"{gateway_url}/models", headers={"Origin": PAGE})
    response = preflight(f"{gateway_url}/chat/completions", requested_headers="authorization")

    assert "access-control-allow-origin" not in answer.headers
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(
    ("raw", "origins"),
    [
        ("*", ("*",)),
        ("", ()),
        (
            "https://a.example, http://localhost:3000",
            ("https://a.example", "http://localhost:3000"),
        ),
    ],
)
def test_the_setting_reads_any_some_or_no_origins(monkeypatch, raw, origins):
    monkeypatch.setenv("GATEWAY_CORS_ALLOWED_ORIGINS", raw)

    assert env_origins("GATEWAY_CORS_ALLOWED_ORIGINS", "*") == origins


@pytest.mark.parametrize(
    "raw",
    [
        "https://a.example/",
        "https://a.example/app",
        "a.example",
        "ftp://a.example",
        "*,https://a.example",
    ],
)
def test_a_bad_origin_setting_fails_loudly(monkeypatch, raw):
    monkeypatch.setenv("GATEWAY_CORS_ALLOWED_ORIGINS", raw)

    with pytest.raises(ImproperlyConfigured, match="GATEWAY_CORS_ALLOWED_ORIGINS"):
        env_origins("GATEWAY_CORS_ALLOWED_ORIGINS", "*")


async def _blank_page(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Another origin's page, for Chromium to call the gateway from."""
    if scope["type"] != "http":
        return
    page = b"<!doctype html><title>another origin</title>"
    headers = [(b"content-type", b"text/html"), (b"content-length", str(len(page)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": page})


# What the openai SDK does in a browser: a POST with its key and its x-stainless-* headers,
# which makes Chromium send a preflight first; the page then reads the answer and its headers.
_FETCH_FROM_THE_PAGE = """async ([url, key]) => {
    const response = await fetch(url, {
        method: "POST",
        headers: {
            "Authorization": `Bearer ${key}`,
            "Content-Type": "application/json",
            "X-Stainless-OS": "Linux",
            "X-Stainless-Retry-Count": "0",
        },
        body: JSON.stringify({model: "fake-small", messages: [{role: "user", content: "Hi"}]}),
    });
    return {
        status: response.status,
        cost: response.headers.get("x-switchboard-cost-usd"),
        requestId: response.headers.get("x-request-id"),
        body: await response.json(),
    };
}"""


def test_a_page_on_another_origin_calls_the_api_in_chromium(gateway_url, catalog, fake_provider):
    org = make_org(credit_usd="10")
    _, key = make_key(org)
    make_key(make_org(credit_usd="10"))  # another organisation, never charged
    page_server = ThreadedServer(_blank_page).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM)
            try:
                page = browser.new_page()
                page.goto(page_server.url)
                result = page.evaluate(
                    _FETCH_FROM_THE_PAGE, [f"{gateway_url}/chat/completions", key]
                )
            finally:
                browser.close()
    finally:
        page_server.stop()

    assert result["status"] == 200
    assert result["body"]["choices"][0]["message"]["content"]
    record = UsageRecord.objects.get()
    assert record.organization_id == org.pk
    assert result["requestId"] == record.request_id
    assert Decimal(result["cost"]) == record.cost_usd > 0
