"""Resource limits added by operations: per-process concurrency, and the upstream pool size."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx

from tests.factories import make_key, make_org
from tests.servers import REPO


def ask(gateway_url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )


def test_it_answers_503_at_once_when_the_process_is_at_capacity(
    gateway_url, catalog, fake_provider, settings
):
    settings.GATEWAY_MAX_REQUESTS_PER_PROCESS = 1
    _, key = make_key(make_org(credit_usd="10"))
    fake_provider.delay_next(3)
    answers: list[httpx.Response] = []
    slow = threading.Thread(target=lambda: answers.append(ask(gateway_url, key)))
    slow.start()
    deadline = time.monotonic() + 10
    while not fake_provider.calls:  # the first request holds the only slot
        assert time.monotonic() < deadline
        time.sleep(0.01)

    started = time.monotonic()
    refused = ask(gateway_url, key)

    assert time.monotonic() - started < 1
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "process_at_capacity"
    assert refused.json()["error"]["type"] == "api_error"
    slow.join(10)
    assert answers[0].status_code == 200
    assert ask(gateway_url, key).status_code == 200  # the slot is free again


def test_the_upstream_pool_size_comes_from_its_setting():
    script = (
        "import django; django.setup(); from gateway import outbound; "
        "print(outbound._LIMITS.max_connections)"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "GATEWAY_UPSTREAM_MAX_CONNECTIONS": "7",
        "GATEWAY_MAX_REQUESTS_PER_PROCESS": "7",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "7"


def test_it_refuses_a_pool_smaller_than_the_per_process_cap():
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "GATEWAY_UPSTREAM_MAX_CONNECTIONS": "7",
        "GATEWAY_MAX_REQUESTS_PER_PROCESS": "8",
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "must not exceed GATEWAY_UPSTREAM_MAX_CONNECTIONS" in result.stderr
