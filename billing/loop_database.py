"""PostgreSQL connections of the event loop's own, for the request path's two statements.

The gateway's reservation and settlement are one statement each (billing/hot_path_sql.py).
Through Django's connection they ran in a thread (Django's connections are synchronous), took
a connection from Django's pool and gave it back (the pool's check: one more round trip) and
went through Django's cursor wrapper: more of the gateway's CPU than the statements themselves
(issue 7, bench/RESULTS.md). Here each event loop keeps a few psycopg async connections in
autocommit, used without leaving the loop.

- At most GATEWAY_DATABASE_THREADS statements run at once per loop (as many as the database
  threads they replace); the others wait for a connection.
- A connection whose state is unknown (a statement cancelled in flight, a broken socket) is
  closed, never reused; one that reported an error in autocommit is idle and is reused.
- Connecting gives up after `CONNECT_TIMEOUT_SECONDS`, and after a connection failure the
  loop's connections are not tried for `RESTING_SECONDS`: the caller then uses Django's path,
  whose pool timeout and outage handling (503, the settlement spool) are the ones documented.
- The connections are closed when their loop ends (portal/event_loops.py).
- Statements of one kind that the loop's requests ask for while earlier ones are in flight
  wait and then go together, as one statement (`Batches`): under load PostgreSQL spent most of
  its time starting, re-checking and committing statements, not changing rows (issue 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import django.db.utils
import psycopg
from django.conf import settings
from django.db import connection as django_connection

from portal.event_loops import loop_resource

CONNECT_TIMEOUT_SECONDS = 2
RESTING_SECONDS = 5.0
_NEVER_BY_COUNT = 2**31 - 1  # psycopg prepares a statement after this many executions
_GENERIC_PLANS = "-c plan_cache_mode=force_generic_plan"
APPLICATION_NAME = "switchboard-event-loop"
# Statements of one kind in flight at once per loop: the others wait and go together once it
# ends. Measured at c=64 (A/B, bench/RESULTS.md), 1, 2 and 4: 526, 462 and 401 requests/s; the
# fewer, the larger the batches and the less PostgreSQL and the gateway spend per request.
BATCHES_IN_FLIGHT = 1
BATCH_MAX_SIZE = 100

_Values = TypeVar("_Values")
_Result = TypeVar("_Result")


class LoopConnections:
    """One event loop's connections (see the module's docstring)."""

    def __init__(self, size: int) -> None:
        self._slots = asyncio.Semaphore(size)
        self._idle: list[psycopg.AsyncConnection[Any]] = []
        self._batches: dict[Callable[..., Any], Batches[Any, Any]] = {}
        self.resting_until = 0.0

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._slots:
            current = self._idle.pop() if self._idle else await self._connect()
            try:
                yield current
            finally:
                if (
                    current.broken
                    or current.closed
                    or current.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
                ):
                    await current.close()
                else:
                    self._idle.append(current)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        try:
            params = _connection_params()
            # PostgreSQL re-planned the prepared statements for their values (custom plans)
            # more often than not; one generic plan serves them (they look rows up by key).
            # Measured: its CPU per request -11% (bench/RESULTS.md).
            params["options"] = f"{params.get('options', '')} {_GENERIC_PLANS}".strip()
            # Told apart from Django's own connections in pg_stat_activity.
            params.setdefault("application_name", APPLICATION_NAME)
            return await psycopg.AsyncConnection.connect(
                **params,
                autocommit=True,
                # Values bound on the server, in binary: quoting them into the text cost more
                # than the rest of the call. Statements are prepared only when asked
                # (hot_path_sql), never by psycopg's count.
                prepare_threshold=_NEVER_BY_COUNT,
                connect_timeout=CONNECT_TIMEOUT_SECONDS,
            )
        except psycopg.OperationalError:
            self.resting_until = time.monotonic() + RESTING_SECONDS
            raise

    def batches(
        self, send: Callable[[LoopConnections, list[_Values]], Awaitable[list[_Result]]]
    ) -> Batches[_Values, _Result]:
        """The loop's batches sent by `send(these connections, values)`."""
        batches = self._batches.get(send)
        if batches is None:
            batches = self._batches[send] = Batches(functools.partial(send, self))
        return batches

    async def close(self) -> None:
        while self._idle:
            await self._idle.pop().close()


class Batches(Generic[_Values, _Result]):
    """One statement's values, sent in batches: a value asked for while BATCHES_IN_FLIGHT
    statements are in flight waits for one of them to end and goes with every value that
    waited with it, as one statement (`send(values)`, which answers each value's result in order).
    Otherwise it goes at once, alone, from its caller's task (no hop: a request alone on its
    loop waits no longer than it did for a statement of its own).

    A batch is all or nothing. When one fails, its values are sent again one by one, so each
    gets its own result or error, as if it had been sent alone; except when the connection
    failed (OperationalError, InterfaceError): all of them get that error, and the caller
    takes Django's path, as for a single statement.
    """

    def __init__(self, send: Callable[[list[_Values]], Awaitable[list[_Result]]]) -> None:
        self._send = send
        self._waiting: list[tuple[_Values, asyncio.Future[_Result]]] = []
        self._in_flight = 0
        self._senders: set[asyncio.Task[None]] = set()  # referenced while they run

    async def run(self, values: _Values) -> _Result:
        if not self._waiting and self._in_flight < BATCHES_IN_FLIGHT:
            self._in_flight += 1
            try:
                (result,) = await self._send([values])
                return result
            finally:
                self._in_flight -= 1
                self._start_senders()
        answer: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((values, answer))
        self._start_senders()
        return await answer

    def _start_senders(self) -> None:
        while self._waiting and self._in_flight < BATCHES_IN_FLIGHT:
            self._in_flight += 1
            sender = asyncio.get_running_loop().create_task(self._send_waiting())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)

    async def _send_waiting(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[:BATCH_MAX_SIZE]
                del self._waiting[:BATCH_MAX_SIZE]
                await self._send_batch(batch)
        finally:
            self._in_flight -= 1

    async def _send_batch(self, batch: list[tuple[_Values, asyncio.Future[_Result]]]) -> None:
        try:
            results = await self._send([values for values, _ in batch])
        except (django.db.utils.OperationalError, django.db.utils.InterfaceError) as error:
            _answer_all(batch, error)
        except django.db.utils.DatabaseError as error:
            if len(batch) == 1:
                _answer_all(batch, error)
            else:
                for one in batch:
                    await self._send_batch([one])
        except BaseException as error:  # cancelled with the loop, or a bug: nobody waits forever
            _answer_all(batch, error)
            raise
        else:
            for (_, answer), result in zip(batch, results, strict=True):
                if not answer.done():  # its waiter may have been cancelled
                    answer.set_result(result)


def _answer_all(batch: list[tuple[Any, asyncio.Future[Any]]], error: BaseException) -> None:
    for _, answer in batch:
        if answer.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            answer.cancel()
        else:
            answer.set_exception(error)


def _connection_params() -> dict[str, Any]:
    """Django's own connection parameters for the default database (name, host, credentials,
    OPTIONS), without what only Django's connections use."""
    params = dict(django_connection.get_connection_params())
    for django_only in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(django_only, None)
    return params


def loop_connections() -> LoopConnections | None:
    """The running loop's connections, or None while they rest after a connection failure."""
    connections = loop_resource(
        LoopConnections,
        lambda: LoopConnections(settings.GATEWAY_DATABASE_THREADS),
        LoopConnections.close,
    )
    return None if time.monotonic() < connections.resting_until else connections


# Django's exception for each of psycopg's DB-API ones, most specific first (the order of
# Django's DatabaseErrorWrapper, which needs a Django connection object per request to use).
_AS_DJANGO = tuple(
    (getattr(psycopg, django_error.__name__), django_error)
    for django_error in (
        django.db.utils.DataError,
        django.db.utils.OperationalError,
        django.db.utils.IntegrityError,
        django.db.utils.InternalError,
        django.db.utils.ProgrammingError,
        django.db.utils.NotSupportedError,
        django.db.utils.DatabaseError,
        django.db.utils.InterfaceError,
        django.db.utils.Error,
    )
)


@contextlib.contextmanager
def as_django_errors() -> Iterator[None]:
    """psycopg's exceptions raised as Django's (DataError, IntegrityError, OperationalError,
    …, with psycopg's as their cause), as Django's cursors raise them: callers handle one
    kind."""
    try:
        yield
    except psycopg.Error as error:
        for psycopg_error, django_error in _AS_DJANGO:
            if isinstance(error, psycopg_error):
                raise django_error(*error.args) from error
        raise
