"""Stripe fixtures: webhook signing, eager Celery, and localstripe as a real subprocess."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings

from billing import stripe_api
from portal.celery import app as celery_app
from tests.stripe_server import PUBLISHABLE_KEY, SECRET_KEY, IdempotentStripe, LocalStripe

WEBHOOK_SECRET = "whsec_test_switchboard"


def sign(payload: bytes, *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header as Stripe computes it: HMAC-SHA256 of `t.payload`."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def event(event_id: str, event_type: str, obj: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": int(time.time()),
            "data": {"object": obj},
        }
    ).encode()


@pytest.fixture
def stripe_webhook_secret() -> Iterator[str]:
    with override_settings(STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET):
        yield WEBHOOK_SECRET


@pytest.fixture
def eager_celery() -> Iterator[None]:
    """Tasks run in the enqueuing thread (after commit, as in production), so tests see their
    effect when the request returns."""
    previous = celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    yield
    celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = previous
    stripe_api._client.cache_clear()


ARTIFACTS_DIR = Path(__file__).resolve().parents[2] / "var" / "test-artifacts"


@pytest.fixture(scope="session")
def _localstripe_server() -> Iterator[LocalStripe]:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    server = LocalStripe().start(log_path=ARTIFACTS_DIR / "localstripe.log")
    yield server
    server.stop()


@pytest.fixture
def localstripe(
    _localstripe_server: LocalStripe, live_server: Any, eager_celery: None
) -> Iterator[LocalStripe]:
    """localstripe, emptied, sending webhooks signed with the test secret to the live server;
    the stripe SDK and Stripe.js of the pages point at it."""
    _localstripe_server.reset(
        webhook_url=f"{live_server.url}/stripe/webhook", webhook_secret=WEBHOOK_SECRET
    )
    with override_settings(
        STRIPE_SECRET_KEY=SECRET_KEY,
        STRIPE_PUBLISHABLE_KEY=PUBLISHABLE_KEY,
        STRIPE_API_BASE=_localstripe_server.url,
        STRIPE_JS_URL=_localstripe_server.js_url,
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
    ):
        yield _localstripe_server


@pytest.fixture(scope="session")
def _idempotent_stripe_server(_localstripe_server: LocalStripe) -> Iterator[IdempotentStripe]:
    proxy = IdempotentStripe(_localstripe_server).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def idempotent_stripe(
    _idempotent_stripe_server: IdempotentStripe, localstripe: LocalStripe
) -> Iterator[IdempotentStripe]:
    """`localstripe`, with the stripe SDK pointed at a proxy that keeps Stripe's promise about
    idempotency keys (which localstripe ignores) and can lose Stripe's answers."""
    _idempotent_stripe_server.reset()
    with override_settings(STRIPE_API_BASE=_idempotent_stripe_server.base_url):
        yield _idempotent_stripe_server
