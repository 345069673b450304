"""Redis down, frozen or restarted under a running gateway: keys with rate limits get a quick
503 in OpenAI's error shape (never a hang), keys without are served, and both are served
again as soon as Redis is back, with no restart of the gateway."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.chaos.run import Redis
from tests.factories import make_key, make_org

# Generous for a loaded machine, far below what redis-py's default retries took (up to 11 s
# a request while Redis restarted): an answer slower than this is a hang.
HANG_SECONDS = 5.0


@pytest.fixture
def own_redis(settings, tmp_path) -> Iterator[Redis]:
    """A redis-server of this test's own, on a fixed port so that it can come back there."""
    redis = Redis(tmp_path)
    redis.start()
    settings.REDIS_URL = f"{redis.url}/0"
    yield redis
    if redis.process is not None and redis.process.poll() is None:
        redis.process.send_signal(signal.SIGCONT)
        redis.stop()


def _key(*, limited: bool) -> str:
    api_key, secret = make_key(make_org(credit_usd="10"))
    if limited:
        api_key.requests_per_minute = 1000
        api_key.save(update_fields=["requests_per_minute"])
    return secret


def ask(gateway_url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": [{"role": "user", "content": "hi"}]},
        timeout=HANG_SECONDS,
    )


def _assert_redis_unavailable(answer: httpx.Response) -> None:
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "service_unavailable"
    assert answer.json()["error"]["type"] == "api_error"
    assert "rate limiter" in answer.json()["error"]["message"]


def test_a_limited_key_gets_a_quick_503_while_redis_is_frozen_then_is_served(
    gateway_url, catalog, own_redis
):
    key = _key(limited=True)
    assert ask(gateway_url, key).status_code == 200
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)  # accepts connections, never answers

    _assert_redis_unavailable(ask(gateway_url, key))

    own_redis.process.send_signal(signal.SIGCONT)
    assert ask(gateway_url, key).status_code == 200


def test_a_limited_key_gets_503_while_redis_is_down_and_is_served_after_its_restart(
    gateway_url, catalog, own_redis
):
    key = _key(limited=True)
    assert ask(gateway_url, key).status_code == 200  # the process now holds pooled connections
    own_redis.stop()

    _assert_redis_unavailable(ask(gateway_url, key))

    own_redis.start()
    assert ask(gateway_url, key).status_code == 200


def test_a_key_without_limits_is_served_while_redis_is_down(gateway_url, catalog, own_redis):
    key = _key(limited=False)
    own_redis.stop()

    assert ask(gateway_url, key).status_code == 200
