"""The gateway's database calls: sync ORM work run in a fixed pool of threads.

Django's ORM is synchronous, so an async view runs it in a thread. Django's own ASGI handler
gives every request a thread of its own (and a connection taken from the pool and given back
by the request's start and end signals); the gateway's handler (gateway/asgi.py) has neither,
so every database call of the request path goes through `db_call` instead: a thread from a
pool of GATEWAY_DATABASE_THREADS, which gives its connection back after each call, as the end
of a request did (a broken connection is never reused, the pool's limits hold).

The hop is the event loop's own `run_in_executor` with a copy of the caller's context, not
asgiref's `sync_to_async`: that one's bookkeeping (thread-sensitive checks, a task and a shield
per call, the context copied back) cost more CPU than the hop itself, on three hops a request
(issue 7, bench/RESULTS.md). Nothing run here calls back into the event loop, and no context
variable set in the thread is needed by the caller.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import AsyncToSync, sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections

logger = logging.getLogger(__name__)
_P = ParamSpec("_P")
_R = TypeVar("_R")

_executor = ThreadPoolExecutor(
    max_workers=settings.GATEWAY_DATABASE_THREADS, thread_name_prefix="gateway-db"
)


def db_call(function: Callable[_P, _R]) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """`function` as a coroutine that runs it in one of the gateway's database threads (with
    the caller's context variables: the request id reaches its log lines).

    Called from sync code through async_to_sync (a management command, a test) it runs in
    that code's own thread instead, on its connection and inside its transaction, as Django's
    sync_to_async does.
    """

    def returning_connection(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        finally:
            close_old_connections()

    in_callers_thread = sync_to_async(function)

    @functools.wraps(function)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if _called_from_sync_code():
            return await in_callers_thread(*args, **kwargs)
        run = functools.partial(
            contextvars.copy_context().run, returning_connection, *args, **kwargs
        )
        return await asyncio.get_running_loop().run_in_executor(_executor, run)

    return call


def _called_from_sync_code() -> bool:
    """Whether this coroutine runs for sync code through async_to_sync (a command, a test
    inside its transaction): its database work then belongs in that code's own thread."""
    return getattr(AsyncToSync.executors, "current", None) is not None


def on_loop_or_in_thread(
    on_loop: Callable[_P, Awaitable[_R | None]], in_thread: Callable[_P, _R]
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """A billing service the gateway calls on its event loop: `on_loop(...)` (its one-statement
    form on the loop's own connections, billing/loop_database.py), and, when that answers None
    (only the service can do it) or cannot reach the database, `in_thread(...)` through
    `db_call`, with Django's pool and outage handling. Called from sync code through
    async_to_sync (a command, a test inside its transaction), only `in_thread`, in the caller's
    own thread and transaction."""
    threaded = db_call(in_thread)

    @functools.wraps(in_thread)
    async def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not _called_from_sync_code():
            try:
                done = await on_loop(*args, **kwargs)
            except (OperationalError, InterfaceError):
                logger.warning("the event loop's database connection failed; using Django's")
                done = None
            if done is not None:
                return done
        return await threaded(*args, **kwargs)

    return call


# (event loop id, key) -> the load in flight for that key in that loop.
_in_flight: dict[tuple[int, Hashable], asyncio.Task[Any]] = {}


async def load_once(key: Hashable, load: Callable[[], Awaitable[_R]]) -> _R:
    """Await `load()`, or the load of `key` already in flight in this event loop.

    When a cached entry expires under load, every request waiting for it would otherwise run
    its own query (64 concurrent requests, 64 catalog loads every few seconds: measured in
    issue 7's profile); this way one query refills it and the others wait for its answer.
    """
    loop = asyncio.get_running_loop()
    slot = (id(loop), key)
    task = _in_flight.get(slot)
    if task is None or task.get_loop() is not loop:

        async def run() -> _R:
            return await load()

        task = loop.create_task(run())
        _in_flight[slot] = task
        task.add_done_callback(
            lambda done: _in_flight.pop(slot, None) if _in_flight.get(slot) is done else None
        )
    # Shielded: a waiter that is cancelled (its client went away) leaves the load to the others.
    return await asyncio.shield(task)
