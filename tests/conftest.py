"""Fixtures shared by the whole suite: real servers and a catalog that routes to them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest

from billing.selectors import ledger_violations
from gateway.auth import forget_cached_keys
from gateway.route_health import forget_route_health
from gateway.selectors import forget_catalog
from gateway.services import catalog_load
from tests.fakes.provider import FakeProvider
from tests.servers import GatewayProcesses, ThreadedServer

FAKE_PROVIDER_KEY_ENV = "SWITCHBOARD_TEST_FAKE_PROVIDER_KEY"
FAKE_PROVIDER_SECRET = "fake-upstream-secret"


@pytest.fixture(autouse=True)
def _fresh_gateway_caches() -> Iterator[None]:
    """Each test starts with cold per-process caches (its database rows are new)."""
    forget_cached_keys()
    forget_catalog()
    forget_route_health()
    yield
    forget_cached_keys()
    forget_catalog()
    forget_route_health()


@pytest.fixture(autouse=True)
def _ledger_stays_balanced(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test that touches the database ends with `reconcile` clean.

    The check depends on the test's database fixture, so it runs before that fixture rolls
    back or flushes. Tests that corrupt the ledger on purpose opt out with
    @pytest.mark.ledger_may_break.
    """
    marker = request.node.get_closest_marker("django_db")
    transactional = "transactional_db" in request.fixturenames or bool(
        marker and (marker.kwargs.get("transaction") or (marker.args and marker.args[0]))
    )
    uses_db = transactional or marker is not None or "db" in request.fixturenames
    if not uses_db or request.node.get_closest_marker("ledger_may_break"):
        yield
        return
    request.getfixturevalue("transactional_db" if transactional else "db")
    yield
    assert ledger_violations(held_longer_than=timedelta(hours=1)) == []


@pytest.fixture(scope="session")
def _fake_provider_server() -> Iterator[FakeProvider]:
    provider = FakeProvider()
    provider.start()
    yield provider
    provider.stop()


@pytest.fixture
def fake_provider(
    _fake_provider_server: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> FakeProvider:
    """The fake OpenAI-style provider, with no recorded calls or scripted faults."""
    _fake_provider_server.reset()
    monkeypatch.setenv(FAKE_PROVIDER_KEY_ENV, FAKE_PROVIDER_SECRET)
    return _fake_provider_server


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """pytest-django's, and before it drops the test database, no other session left on it."""
    yield
    with django_db_blocker.unblock():
        _other_sessions_ended()


@pytest.fixture(scope="session")
def gateway_server(django_db_setup: None, django_db_blocker: Any) -> Iterator[ThreadedServer]:
    """Switchboard's real ASGI application served by uvicorn on a free port."""
    from portal.asgi import application

    server = ThreadedServer(application).start()
    yield server
    server.stop()


def _other_sessions_ended(*, timeout: float = 5.0) -> None:
    """Wait until PostgreSQL has ended every other session on the test database, then end
    those left: the database cannot be dropped while one remains. The event loop's sessions
    (billing/loop_database.py) leave a moment after their loop closed them; a pooled
    connection of a thread still alive leaves only when told to."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return
    others = "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while True:
            cursor.execute(f"SELECT count(*) {others}")
            (remaining,) = cursor.fetchone()
            if not remaining:
                return
            if time.monotonic() >= deadline:
                cursor.execute(f"SELECT pg_terminate_backend(pid) {others}")
                return
            time.sleep(0.05)


@pytest.fixture
def gateway_url(gateway_server: ThreadedServer, transactional_db: None) -> str:
    """The gateway's OpenAI base URL. Uses transactional_db: the server's own database
    connections must see what the test commits."""
    return f"{gateway_server.url}/v1"


@pytest.fixture
def catalog(fake_provider: FakeProvider, transactional_db: None) -> dict[str, object]:
    """A catalog whose model `fake-small` routes to the fake provider."""
    data: dict[str, object] = {
        "providers": [
            {
                "name": "fake",
                "kind": "openai",
                "base_url": fake_provider.base_url,
                "api_key_env": FAKE_PROVIDER_KEY_ENV,
            }
        ],
        "models": [
            {
                "name": "fake-small",
                "routes": [{"provider": "fake", "upstream_model": "fake-small-upstream"}],
                "price": {"input": "0.50", "output": "1.50"},
            }
        ],
    }
    catalog_load(data=data)
    return data


@pytest.fixture
def start_gateways(
    fake_provider: FakeProvider, transactional_db: None
) -> Iterator[Callable[[int], GatewayProcesses]]:
    """Start N gateway processes sharing the test database and Redis; stopped after the test."""
    started: list[GatewayProcesses] = []

    def start(count: int) -> GatewayProcesses:
        started.append(GatewayProcesses(count).start())
        return started[-1]

    yield start
    for processes in started:
        processes.stop()


@pytest.fixture
def gateway_processes(start_gateways: Callable[[int], GatewayProcesses]) -> GatewayProcesses:
    """Four gateway processes (on two cores: enough to race)."""
    return start_gateways(4)
