"""Prometheus metrics: the gateway's instruments and the protected `/metrics` page.

The request path touches this module twice, both cheap (a few label lookups and additions,
measured at about 10 µs a request): `upstream_timed` around the call to the provider, and
`request_finished` once, when the request is settled. Gauges that need a query (holds
outstanding, Celery's queue) are computed when `/metrics` is scraped, never on the hot path.

With several worker processes set PROMETHEUS_MULTIPROC_DIR to an empty folder shared by
them (emptied before they start): every process writes its counters there and any of them
answers the scrape with the sum (prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import functools
import hmac
import os
import time
from collections.abc import Awaitable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import TypeVar

import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from billing.metrics import ReservationsCollector
from billing.models import UsageRecord
from gateway.providers.base import UpstreamStream
from portal.redis_clients import redis_client

_T = TypeVar("_T")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_OVERHEAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

REQUESTS = Counter(
    "switchboard_gateway_requests_total",
    "Requests that reached a provider, by catalog model, provider and outcome "
    "(ok, interrupted, upstream_error).",
    ["model", "provider", "status"],
)
UPSTREAM_SECONDS = Histogram(
    "switchboard_gateway_upstream_seconds",
    "The provider's time: to its whole answer, or to the start of a stream.",
    ["provider"],
    buckets=_LATENCY_BUCKETS,
)
OVERHEAD_SECONDS = Histogram(
    "switchboard_gateway_overhead_seconds",
    "Time the gateway adds: from arrival to the upstream call (key, limits, reservation), "
    "plus, for a whole answer, from the provider's answer to the settled charge.",
    buckets=_OVERHEAD_BUCKETS,
)
FIRST_TOKEN_SECONDS = Histogram(
    "switchboard_gateway_time_to_first_token_seconds",
    "Streams: from arrival until the provider's stream began.",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
TOKENS = Counter(
    "switchboard_gateway_tokens_total",
    "Tokens charged, by catalog model and kind (input, output).",
    ["model", "kind"],
)
SPEND = Counter(
    "switchboard_gateway_spend_usd_total",
    "USD charged to wallets, by catalog model (a float: for watching; the ledger is exact).",
    ["model"],
)
SETTLEMENTS_SPOOLED = Counter(
    "switchboard_gateway_settlements_spooled_total",
    "Settlements the database could not take, written to the spool for replay (redis, file).",
    ["spool"],
)

# (upstream call started, its answer or stream began, streamed), time.monotonic() seconds;
# set in the request's own task, so the settling of the same request reads it.
_upstream: ContextVar[tuple[float, float, bool] | None] = ContextVar("upstream", default=None)


async def upstream_timed(call: Awaitable[_T]) -> _T:
    """Await the provider call, noting when it started and answered (the last attempt wins)."""
    started = time.monotonic()
    answer = await call
    _upstream.set((started, time.monotonic(), isinstance(answer, UpstreamStream)))
    return answer


@functools.cache
def _model_series(model: str) -> tuple[Counter, Counter, Counter, Histogram]:
    # labels() takes a lock and checks its arguments each call; the children are kept
    # instead (a catalog has few models and providers, so this stays small).
    return (
        TOKENS.labels(model, "input"),
        TOKENS.labels(model, "output"),
        SPEND.labels(model),
        FIRST_TOKEN_SECONDS.labels(model),
    )


@functools.cache
def _route_series(model: str, provider: str, status: str) -> tuple[Counter, Histogram]:
    return REQUESTS.labels(model, provider, status), UPSTREAM_SECONDS.labels(provider)


def request_finished(record: UsageRecord, *, started: float) -> None:
    """Count a settled request: its outcome, tokens, spend and timings. `started` is the
    time.monotonic() at which it arrived."""
    input_tokens, output_tokens, spend, first_token = _model_series(record.model)
    requests, upstream_seconds = _route_series(record.model, record.provider, record.status)
    requests.inc()
    if record.input_tokens:
        input_tokens.inc(record.input_tokens)
    if record.output_tokens:
        output_tokens.inc(record.output_tokens)
    if record.cost_usd:
        # A metric, not money: Prometheus has floats only; the ledger keeps the exact amount.
        spend.inc(float(record.cost_usd))
    upstream = _upstream.get()
    if upstream is None:  # every route failed before answering
        return
    upstream_started, answered, streamed = upstream
    upstream_seconds.observe(answered - upstream_started)
    overhead = upstream_started - started
    if streamed:
        first_token.observe(answered - started)
    else:
        overhead += time.monotonic() - answered
    OVERHEAD_SECONDS.observe(overhead)


class _CeleryQueueCollector:
    """Messages waiting in Celery's default queue, read from the broker at scrape time."""

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "switchboard_celery_queue_depth", "Tasks waiting in the Celery broker's queue."
        )
        waiting = _queue_depth(settings.CELERY_BROKER_URL)
        if waiting is not None:
            depth.add_metric([], waiting)
        yield depth


def _queue_depth(broker_url: str) -> int | None:
    queue = getattr(settings, "CELERY_TASK_DEFAULT_QUEUE", "celery")
    if broker_url.startswith(("redis://", "rediss://")):
        client = redis_client(broker_url)
        try:
            # kombu keeps a priority's messages in a list of their own ("celery\x06\x163", …).
            names = [queue, *(f"{queue}\x06\x16{step}" for step in (1, 2, 3, 4, 5, 6, 7, 8, 9))]
            return sum(int(client.llen(name)) for name in names)
        except redis.RedisError:
            return None
    if broker_url.startswith("filesystem://"):
        folder = Path(str(settings.CELERY_BROKER_TRANSPORT_OPTIONS["data_folder_in"]))
        return sum(1 for _ in folder.glob(f"*.{queue}.msg")) if folder.is_dir() else 0
    return None


def _exposition() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        counted = CollectorRegistry()
        multiprocess.MultiProcessCollector(counted)
    else:
        counted = REGISTRY
    now = CollectorRegistry()
    now.register(ReservationsCollector())
    now.register(_CeleryQueueCollector())
    return generate_latest(counted) + generate_latest(now)


@csrf_exempt
def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics with `Authorization: Bearer <METRICS_TOKEN>`; 404 while no token is set,
    401 without the right one."""
    token = settings.METRICS_TOKEN
    if not token:
        return HttpResponse("Not found.\n", status=404, content_type="text/plain")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return HttpResponse(
            "A bearer token is required.\n",
            status=401,
            content_type="text/plain",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    try:
        body = _exposition()
    finally:
        # The gateway's handler serves this page and sends no request signals, so nothing else
        # gives back the connection the reservation gauge used (a broken one would stay
        # broken, a good one would stay open for good).
        if not connection.in_atomic_block:
            connection.close()
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
