"""Step 7 of the request path, made durable: a request whose usage the database cannot take
is retried briefly, then spooled (billing/settlement_spool.py) and replayed by this process
once the database is back. A request that was answered is never left uncharged because
PostgreSQL was down at its end, and never charged twice (settlement is idempotent by request
id, whoever replays it and however often).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from billing.models import UsageRecord
from billing.services import MeteredRequest, usage_settle, usage_settle_on_loop
from billing.settlement_spool import (
    ReplayOutcome,
    database_unavailable,
    settlement_spool,
    spooled_settlements_replay,
    spooled_usage_record,
)
from gateway import metrics
from gateway.database import on_loop_or_in_thread

logger = logging.getLogger(__name__)

# The hot path's settle, like reserve: on the event loop's own connections, or in one of the
# gateway's database threads (a test's or command's own thread when called from sync code).
_settle = on_loop_or_in_thread(usage_settle_on_loop, usage_settle)
_FIRST_BACKOFF_SECONDS = 0.1
_MAX_BACKOFF_SECONDS = 1.0


def _settle_on_fresh_connection(metered: MeteredRequest) -> UsageRecord:
    # Retries run in a pool thread that is not the request's: its connection is closed after
    # each try, so a broken one is never reused and none is kept by an idle thread.
    try:
        return usage_settle(metered=metered)
    finally:
        connection.close()


def _replay_on_fresh_connection() -> ReplayOutcome:
    try:
        return spooled_settlements_replay()
    finally:
        connection.close()


async def usage_settle_durably(*, metered: MeteredRequest) -> UsageRecord:
    """Settle a request as `usage_settle` does. While the database is unreachable, retry with
    backoff; once the request has waited BILLING_SETTLE_WAIT_SECONDS, spool it and answer
    with the record it will have (unsaved: its cost is what the replay charges). Other
    failures propagate."""
    deadline = time.monotonic() + settings.BILLING_SETTLE_WAIT_SECONDS
    backoff = _FIRST_BACKOFF_SECONDS
    # The first try is the hot path's, through the database thread pool.
    attempt = asyncio.ensure_future(_settle(metered=metered))
    while True:
        # A try may wait DATABASE_POOL_TIMEOUT_SECONDS for a connection; the request waits
        # only until the deadline. A try still running then may yet commit: the replay then
        # finds the request settled and charges nothing more. (`asyncio.wait` leaves the try
        # running at the deadline or when the request is cancelled, as a shield would, for
        # less per-request work than `wait_for` around a shield.)
        done, _ = await asyncio.wait((attempt,), timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            attempt.add_done_callback(_quiet)
            break
        try:
            return attempt.result()
        except Exception as exc:
            if not database_unavailable(exc):
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            break
        logger.warning(
            "request %s: database unavailable at settlement, retrying", metered.request_id
        )
        await asyncio.sleep(min(backoff, left))
        backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
        attempt = asyncio.ensure_future(
            sync_to_async(_settle_on_fresh_connection, thread_sensitive=False)(metered)
        )
    where = await sync_to_async(settlement_spool, thread_sensitive=False)(metered=metered)
    metrics.SETTLEMENTS_SPOOLED.labels(spool=where).inc()
    logger.warning(
        "request %s: database unavailable, settlement spooled (%s) for replay",
        metered.request_id,
        where,
    )
    replay_spool_soon()
    return spooled_usage_record(metered)


def _quiet(attempt: asyncio.Future[UsageRecord]) -> None:
    if not attempt.cancelled():
        attempt.exception()  # retrieved: the spool has the request


_replayers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def replay_spool_soon() -> None:
    """Make sure this event loop replays the spool until it is empty (one task per loop)."""
    loop = asyncio.get_running_loop()
    running = _replayers.get(loop)
    if running is None or running.done():
        _replayers[loop] = loop.create_task(_replay_until_empty())


async def _replay_until_empty() -> None:
    replay = sync_to_async(_replay_on_fresh_connection, thread_sensitive=False)
    while True:
        await asyncio.sleep(settings.BILLING_SPOOL_REPLAY_SECONDS)
        try:
            outcome = await replay()
        except Exception:
            logger.exception("replaying the settlement spool failed")
            continue
        if not outcome.remaining:
            return
