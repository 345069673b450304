"""/healthz and /readyz: no authentication, fast, and 503 naming the dependency that is down."""

from __future__ import annotations

import httpx
import pytest

from portal.api_keys import generate_key
from tests.servers import GatewayProcesses
from tests.services import free_port


@pytest.fixture
def site_url(gateway_server, transactional_db, settings) -> str:
    # The suite's Redis doubles as the broker, as in production.
    settings.CELERY_BROKER_URL = settings.REDIS_URL
    return gateway_server.url


def test_it_answers_healthz_without_touching_a_dependency(site_url, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = httpx.get(f"{site_url}/healthz", headers={"Host": "10.0.0.7"})
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_it_is_ready_when_database_redis_and_broker_answer(site_url):
    response = httpx.get(f"{site_url}/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "database": "ok",
        "redis": "ok",
        "broker": "ok",
    }


def test_it_names_redis_when_redis_is_down(site_url, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    # Within its own timeout, with a margin for a loaded machine (the client's timeout).
    response = httpx.get(f"{site_url}/readyz", timeout=settings.READINESS_TIMEOUT_SECONDS + 3)
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "database": "ok",
        "redis": "unreachable",
        "broker": "ok",
    }


def test_it_names_the_broker_when_the_broker_is_down(site_url, settings):
    settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{free_port()}/1"
    response = httpx.get(f"{site_url}/readyz", timeout=10)
    assert response.status_code == 503
    assert response.json()["broker"] == "unreachable"
    assert response.json()["redis"] == "ok"


def test_it_names_the_database_when_postgres_is_unreachable(transactional_db):
    dead_database = f"postgres://switchboard@127.0.0.1:{free_port()}/switchboard"
    processes = GatewayProcesses(1, env={"DATABASE_URL": dead_database}).start()
    try:
        base = processes.urls[0].removesuffix("/v1")
        assert httpx.get(f"{base}/healthz").status_code == 200
        # The client's timeout is the test of speed (no timed assertion: a loaded machine
        # stretches any bound): without READINESS_TIMEOUT_SECONDS the check would wait the
        # pool's 30 s.
        response = httpx.get(f"{base}/readyz", timeout=10)
        assert response.status_code == 503
        assert response.json()["database"] == "unreachable"
        assert response.json()["redis"] == "ok"
    finally:
        processes.stop()


def test_the_gateway_answers_503_quickly_while_the_database_is_unreachable(transactional_db):
    dead_database = f"postgres://switchboard@127.0.0.1:{free_port()}/switchboard"
    env = {"DATABASE_URL": dead_database, "DATABASE_POOL_TIMEOUT_SECONDS": "1"}
    processes = GatewayProcesses(1, env=env).start()
    try:
        # Answered within the client's timeout, not the default pool timeout (30 s).
        response = httpx.post(
            f"{processes.urls[0]}/chat/completions",
            headers={"Authorization": f"Bearer {generate_key()}"},
            json={"model": "fake-small", "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"
    finally:
        processes.stop()
