"""/metrics: protected by a bearer token; counts what the gateway served, across processes."""

from __future__ import annotations

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import make_key, make_org
from tests.servers import GatewayProcesses

TOKEN = "metrics-test-token"
MESSAGES = [{"role": "user", "content": "count me"}]


def scrape(base_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def site_url(gateway_server, catalog, settings) -> str:
    settings.METRICS_TOKEN = TOKEN
    return gateway_server.url


def test_it_is_not_found_while_no_token_is_set(gateway_server, settings):
    settings.METRICS_TOKEN = ""
    response = httpx.get(f"{gateway_server.url}/metrics", headers={"Authorization": "Bearer x"})
    assert response.status_code == 404


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
def test_it_refuses_a_scrape_without_the_token(site_url, header):
    headers = {"Authorization": header} if header else {}
    response = httpx.get(f"{site_url}/metrics", headers=headers)
    assert response.status_code == 401
    assert "switchboard" not in response.text


def test_it_counts_requests_tokens_spend_and_timings(site_url):
    _, key = make_key(make_org(credit_usd="10"))
    client = openai.OpenAI(base_url=f"{site_url}/v1", api_key=key, max_retries=0)
    before = scrape(site_url)

    reply = client.chat.completions.create(model="fake-small", messages=MESSAGES)  # type: ignore[arg-type]
    stream = client.chat.completions.create(model="fake-small", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
    for _ in stream:
        pass

    after = scrape(site_url)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert reply.usage is not None
    labels = {"model": "fake-small", "provider": "fake", "status": "ok"}
    assert grew("switchboard_gateway_requests_total", **labels) == 2
    assert grew("switchboard_gateway_tokens_total", model="fake-small", kind="input") == 2 * (
        reply.usage.prompt_tokens
    )
    assert grew("switchboard_gateway_spend_usd_total", model="fake-small") > 0
    assert grew("switchboard_gateway_upstream_seconds_count", provider="fake") == 2
    assert grew("switchboard_gateway_overhead_seconds_count") == 2
    assert grew("switchboard_gateway_time_to_first_token_seconds_count", model="fake-small") == 1
    assert value(after, "switchboard_reservations_outstanding") == 0


def test_it_reads_the_celery_queue_depth_from_the_broker(site_url, settings):
    settings.CELERY_BROKER_URL = settings.REDIS_URL
    broker = redis.Redis.from_url(settings.REDIS_URL)
    broker.delete("celery")
    broker.lpush("celery", b"{}", b"{}", b"{}")
    try:
        assert value(scrape(site_url), "switchboard_celery_queue_depth") == 3
    finally:
        broker.delete("celery")


def test_it_sums_the_counters_of_every_worker_process(catalog, fake_provider, tmp_path):
    _, key = make_key(make_org(credit_usd="10"))
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "METRICS_TOKEN": TOKEN}
    processes = GatewayProcesses(2, env=env).start()
    try:
        for url in processes.urls:
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
            client.chat.completions.create(model="fake-small", messages=MESSAGES)  # type: ignore[arg-type]
        samples = scrape(processes.urls[0].removesuffix("/v1"))
        labels = {"model": "fake-small", "provider": "fake", "status": "ok"}
        assert value(samples, "switchboard_gateway_requests_total", **labels) == 2
    finally:
        processes.stop()


def test_it_counts_webhook_outcomes_that_billing_reports(site_url):
    from billing.metrics import webhook_outcome_count

    labels = {"event_type": "payment_intent.succeeded", "outcome": "processed"}
    before = value(scrape(site_url), "switchboard_stripe_webhooks_total", **labels)
    webhook_outcome_count(event_type="payment_intent.succeeded", outcome="processed")
    after = value(scrape(site_url), "switchboard_stripe_webhooks_total", **labels)
    assert after - before == 1
