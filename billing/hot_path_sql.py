"""The request path's reservation and settlement on PostgreSQL, one statement each.

`credit_reserve` and `usage_settle` (billing/services.py) write several rows in one
transaction. Through the ORM that is 5 and 7 to 9 statements, each a round trip, and the
organisation's wallet row stays locked from its UPDATE until the COMMIT: every request of an
organisation waits for the one before it, so the round trips, not the work, set its throughput
(issue 7; bench/RESULTS.md). Here each is a single statement of data-modifying CTEs: one round
trip, committed by itself (autocommit), the wallet locked for the statement's own execution only.

Semantics are the ORM path's, row for row (the same tests run against both):
- Rows are locked in the ORM path's order (reservation, spend window, wallet, revenue): each CTE
  that must come after another reads it, which makes PostgreSQL run that one first.
- Concurrency: every UPDATE re-checks its WHERE against the committed row it waited for
  (READ COMMITTED), exactly as the ORM's conditional UPDATEs do.
- All or nothing: a statement is atomic. When a result must not be committed (a spend window
  held but the wallet refused, an account missing), the statement divides by zero on purpose,
  which aborts it whole; `AbortedOnPurpose` is how the caller recognises that.

The services fall back to the ORM path for what this does not do (another database, a window's
or an account's first use).
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar, cast

import psycopg
from django.conf import settings
from django.db import DataError, connection
from psycopg.types.numeric import Int8

from billing.loop_database import LoopConnections, as_django_errors
from billing.models import (
    Account,
    KeySpend,
    LedgerTransaction,
    Posting,
    Reservation,
    UsageRecord,
)
from portal.models import ApiKey

_ACCOUNT = Account._meta.db_table
_KEYSPEND = KeySpend._meta.db_table
_RESERVATION = Reservation._meta.db_table
_ENTRY = LedgerTransaction._meta.db_table
_POSTING = Posting._meta.db_table
_USAGE = UsageRecord._meta.db_table
_API_KEY = ApiKey._meta.db_table

_Result = TypeVar("_Result")

# SQLSTATE of division_by_zero: the statements' deliberate abort.
_DIVISION_BY_ZERO = "22012"


@functools.cache
def available() -> bool:
    """Whether the default database runs these statements (PostgreSQL only). Asked once: in
    an event loop each request's task would otherwise build a Django connection object of its
    own just to answer it."""
    return connection.vendor == "postgresql"


def aborted_on_purpose(error: DataError) -> bool:
    """Whether `error` is one of these statements refusing to commit (not a real data error)."""
    return getattr(error.__cause__, "sqlstate", None) == _DIVISION_BY_ZERO


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One of the request path's statements, prepared once per database connection.

    Planned afresh every time, the settlement spent 0.7 ms of PostgreSQL's time planning for
    0.4 ms running, and the reservation 0.2 ms planning (issue 7, bench/RESULTS.md). On
    Django's connection (`Statement.run`), a named SQL `PREPARE` keeps the plan for the
    connection's life: later calls send only `EXECUTE name(values)`, through Django's usual
    cursor (its error translation and query log). Not psycopg's automatic preparation there:
    it forgets a statement whose execution failed without deallocating it, these statements
    fail on purpose (`aborted_on_purpose`), and that connection cannot simply be closed (it
    may be inside its caller's transaction). The event loop's own connections use psycopg's
    (`Statement.run_on_loop`).

    `text` names its values `%(name)s`; `types` gives each one's SQL type, in the order of
    the prepared statement's parameters.
    """

    name: str
    text: str
    types: dict[str, str]

    def prepare_sql(self) -> str:
        position = {name: index for index, name in enumerate(self.types, start=1)}
        body = re.sub(r"%\((\w+)\)s", lambda match: f"${position[match[1]]}", self.text)
        return f"PREPARE {self.name} ({', '.join(self.types.values())}) AS {body}"

    def execute_sql(self) -> str:
        return f"EXECUTE {self.name} ({', '.join(f'%({name})s' for name in self.types)})"


# Which statements each open connection has prepared (the psycopg connection object lives as
# long as its server session, in or out of Django's pool).
_prepared_on: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class Statement(Generic[_Result]):
    """One of these statements with its values, and how to read its row: run by `run()` on
    Django's connection (a sync caller, inside its transaction if it has one), or by
    `await run_on_loop()` on the event loop's own connections (billing/loop_database.py)."""

    prepared: _Prepared
    params: dict[str, Any]
    read: Callable[[tuple[Any, ...]], _Result]

    def run(self) -> _Result:
        with connection.cursor() as cursor:
            for sql, params in self._sends(connection.connection):
                cursor.execute(sql, params)
            return self.read(cast(tuple[Any, ...], cursor.fetchone()))

    async def run_on_loop(self, connections: LoopConnections) -> _Result:
        """On the loop's connection, the values bound on the server: psycopg prepares the
        statement itself (at the protocol level, once per session). It forgets a prepared
        statement whose execution failed without deallocating it, and these statements fail
        on purpose (`aborted_on_purpose`): the session is then closed, and its statements
        with it, so none is left behind (a refusal, or an account's first use, is rare)."""
        with as_django_errors():  # connecting included
            async with connections.connection() as session:
                cursor = session.cursor()
                # Every integer as bigint: psycopg types each by its size, and each mix of
                # types would be prepared as a statement of its own.
                params = {
                    name: Int8(value) if type(value) is int else value
                    for name, value in self.params.items()
                }
                try:
                    await cursor.execute(
                        self.prepared.text, params, prepare=settings.DATABASE_PREPARED_STATEMENTS
                    )
                except psycopg.Error:
                    await session.close()
                    raise
                return self.read(cast(tuple[Any, ...], await cursor.fetchone()))

    def _sends(self, session: Any) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """What to send on `session` (a psycopg connection), one after the other: the
        statement's PREPARE first if the session has not got it yet, then its EXECUTE (with
        DATABASE_PREPARED_STATEMENTS off: the plain statement, planned every time)."""
        if not settings.DATABASE_PREPARED_STATEMENTS:
            yield self.prepared.text, self.params
            return
        prepared = _prepared_on.setdefault(session, set())
        if self.prepared.name not in prepared:
            yield self.prepared.prepare_sql(), None
            # Reached once the PREPARE ran. It outlives a rollback: once per session.
            prepared.add(self.prepared.name)
        yield self.prepared.execute_sql(), self.params


_RESERVE = _Prepared(
    name="sb_reserve",
    text=f"""
WITH spend_window AS (
    UPDATE {_KEYSPEND} SET reserved_usd = reserved_usd + %(amount)s
    WHERE %(capped)s AND api_key_id = %(api_key_id)s AND window_start = %(window_start)s
      AND spent_usd + reserved_usd <= %(cap_left_usd)s
    RETURNING id
), wallet AS (
    UPDATE {_ACCOUNT} SET reserved_usd = reserved_usd + %(amount)s
    WHERE organization_id = %(organization_id)s AND kind = 'wallet'
      AND balance_usd - reserved_usd >= %(amount)s
      AND (NOT %(capped)s OR (SELECT count(*) FROM spend_window) = 1)
    RETURNING id
), hold AS (
    INSERT INTO {_RESERVATION} (
        request_id, organization_id, api_key_id, amount_usd, spend_window_start, state,
        created_at, checkpoint_model, checkpoint_provider, checkpoint_upstream_model
    )
    SELECT %(request_id)s, %(organization_id)s, %(api_key_id)s, %(amount)s, %(window_start)s,
        'held', %(now)s, '', '', ''
    FROM wallet
    RETURNING id
)
SELECT
    (SELECT count(*) FROM spend_window),
    (SELECT count(*) FROM hold),
    EXISTS (
        SELECT 1 FROM {_KEYSPEND}
        WHERE api_key_id = %(api_key_id)s AND window_start = %(window_start)s
    ),
    -- A spend window held for a request its wallet refuses must not be committed.
    1 / CASE
        WHEN (SELECT count(*) FROM spend_window) = 1 AND (SELECT count(*) FROM hold) = 0
        THEN 0 ELSE 1
    END
""",  # noqa: S608 (table names come from the models; every value is a parameter)
    types={
        "amount": "numeric",
        "capped": "boolean",
        "api_key_id": "bigint",
        "window_start": "timestamptz",
        "cap_left_usd": "numeric",
        "organization_id": "bigint",
        "request_id": "text",
        "now": "timestamptz",
    },
)


@dataclass(frozen=True, slots=True)
class Reserved:
    """What the reservation statement did."""

    held: bool  # the reservation was made (wallet and spend window held)
    window_refused: bool  # a capped key's window did not fit the amount (nothing was held)
    window_missing: bool  # a capped key's window has no row yet (the ORM path makes it)


def reserve(
    *,
    request_id: str,
    organization_id: int,
    api_key_id: int,
    amount_usd: Decimal,
    cap_usd: Decimal | None,
    window_start: datetime | None,
    now: datetime,
) -> Statement[Reserved]:
    """Hold `amount_usd` of the wallet and, when `cap_usd` is given, of the key's spend window
    starting at `window_start`; one statement. A refusal by the wallet while the window fitted
    raises DataError (`aborted_on_purpose`): the caller reports InsufficientCredit."""
    capped = cap_usd is not None
    params: dict[str, Any] = {
        "request_id": request_id,
        "organization_id": organization_id,
        "api_key_id": api_key_id,
        "amount": amount_usd,
        "capped": capped,
        "window_start": window_start,
        "cap_left_usd": (cap_usd - amount_usd) if cap_usd is not None else Decimal(0),
        "now": now,
    }

    def read(row: tuple[Any, ...]) -> Reserved:
        windows, holds, window_exists, _ = row
        return Reserved(
            held=holds == 1,
            window_refused=capped and windows == 0 and window_exists,
            window_missing=capped and not window_exists,
        )

    return Statement(_RESERVE, params, read)


_SETTLE = _Prepared(
    name="sb_settle",
    text=f"""
WITH claim AS (
    UPDATE {_RESERVATION} SET state = %(state)s, resolved_at = %(now)s
    WHERE request_id = %(request_id)s AND state = 'held'
    RETURNING organization_id, amount_usd, api_key_id, spend_window_start
), swept AS (
    -- A hold the sweeper voided before this settlement came (it waited in the spool through
    -- an outage longer than the sweep bound): nothing to release, but the charge still counts
    -- in the spend window it was reserved in. (This statement's snapshot shows a hold it
    -- claims as still held, so a claimed hold is never counted twice.)
    SELECT api_key_id, spend_window_start, 0 AS amount_usd FROM {_RESERVATION}
    WHERE request_id = %(request_id)s AND state = 'voided'
), spend_window AS (
    UPDATE {_KEYSPEND} AS spend
    SET reserved_usd = spend.reserved_usd - resolved.amount_usd,
        spent_usd = spend.spent_usd + %(cost)s
    FROM (
        SELECT api_key_id, spend_window_start, amount_usd FROM claim
        UNION ALL
        SELECT api_key_id, spend_window_start, amount_usd FROM swept
    ) AS resolved
    WHERE spend.api_key_id = resolved.api_key_id
      AND spend.window_start = resolved.spend_window_start
    RETURNING spend.id
), wallet AS (
    -- The charge and the hold's release move the wallet in one UPDATE. The hold is released
    -- from the wallet that made it (always the request's, by construction).
    UPDATE {_ACCOUNT} AS account
    SET balance_usd = account.balance_usd
            - CASE WHEN account.organization_id = %(organization_id)s THEN %(cost)s ELSE 0 END,
        reserved_usd = account.reserved_usd - COALESCE(
            (SELECT amount_usd FROM claim WHERE claim.organization_id = account.organization_id),
            0
        )
    WHERE account.kind = 'wallet'
      AND (
        (account.organization_id = %(organization_id)s AND %(cost)s > 0)
        OR account.organization_id IN (SELECT organization_id FROM claim)
      )
      AND (SELECT count(*) FROM spend_window) >= 0  -- after the spend window
    RETURNING account.id, account.organization_id
), revenue AS (
    SELECT id FROM {_ACCOUNT} WHERE organization_id IS NULL AND kind = 'revenue'
), entry AS (
    INSERT INTO {_ENTRY} (kind, memo, created_at)
    SELECT 'usage', %(memo)s, %(now)s WHERE %(cost)s > 0
    RETURNING id
), postings AS (
    INSERT INTO {_POSTING} (transaction_id, account_id, amount_usd)
    SELECT entry.id, wallet.id, %(negative_cost)s
    FROM entry, wallet WHERE wallet.organization_id = %(organization_id)s
    UNION ALL
    SELECT entry.id, revenue.id, %(cost)s FROM entry, revenue
    RETURNING id
), record AS (
    INSERT INTO {_USAGE} (
        request_id, organization_id, api_key_id, model, provider, upstream_model, attempts,
        status, http_status, input_tokens, output_tokens, cached_input_tokens,
        cache_write_input_tokens, usage_source, cost_usd, latency_ms, time_to_first_token_ms,
        ledger_transaction_id, created_at
    )
    VALUES (
        %(request_id)s, %(organization_id)s, %(api_key_id)s, %(model)s, %(provider)s,
        %(upstream_model)s, %(attempts)s, %(status)s, %(http_status)s, %(input_tokens)s,
        %(output_tokens)s, %(cached_input_tokens)s, %(cache_write_input_tokens)s,
        %(usage_source)s, %(cost)s, %(latency_ms)s, %(time_to_first_token_ms)s,
        (SELECT id FROM entry), %(now)s
    )
    RETURNING id
), revenue_moved AS (
    -- Last: the one row every organisation's settlement updates is locked for the shortest
    -- time.
    UPDATE {_ACCOUNT} SET balance_usd = balance_usd + %(cost)s
    WHERE id = (SELECT id FROM revenue) AND %(cost)s > 0
      AND (SELECT count(*) FROM record) = 1
    RETURNING id
), last_used AS (
    UPDATE {_API_KEY} SET last_used_at = %(now)s
    WHERE %(touch_last_used)s AND id = %(api_key_id)s
      AND (last_used_at IS NULL OR last_used_at < %(last_used_before)s)
    RETURNING id
)
SELECT
    record.id,
    (SELECT count(*) FROM claim),
    (SELECT id FROM entry),
    -- A charge needs both accounts (the first of each is made by the ORM path): without
    -- them, nothing is committed.
    1 / CASE
        WHEN %(cost)s > 0 AND (
            (SELECT count(*) FROM postings) <> 2 OR (SELECT count(*) FROM revenue_moved) <> 1
        ) THEN 0
        WHEN (SELECT count(*) FROM claim) <> (
            SELECT count(*) FROM wallet WHERE wallet.organization_id IN (
                SELECT organization_id FROM claim
            )
        ) THEN 0
        ELSE 1
    END
FROM record
""",  # noqa: S608 (table names come from the models; every value is a parameter)
    types={
        "state": "text",
        "now": "timestamptz",
        "request_id": "text",
        "cost": "numeric",
        "organization_id": "bigint",
        "memo": "text",
        "negative_cost": "numeric",
        "api_key_id": "bigint",
        "model": "text",
        "provider": "text",
        "upstream_model": "text",
        "attempts": "integer",
        "status": "text",
        "http_status": "integer",
        "input_tokens": "bigint",
        "output_tokens": "bigint",
        "cached_input_tokens": "bigint",
        "cache_write_input_tokens": "bigint",
        "usage_source": "text",
        "latency_ms": "integer",
        "time_to_first_token_ms": "integer",
        "touch_last_used": "boolean",
        "last_used_before": "timestamptz",
    },
)


@dataclass(frozen=True, slots=True)
class Settled:
    usage_record_id: int
    claimed: bool  # a held reservation was resolved
    ledger_transaction_id: int | None


def settle(
    *,
    request_id: str,
    organization_id: int,
    api_key_id: int,
    reservation_state: str,
    cost_usd: Decimal,
    memo: str,
    record: dict[str, Any],
    touch_last_used: bool,
    last_used_before: datetime,
    now: datetime,
) -> Statement[Settled]:
    """Claim the request's held reservation (if any) into `reservation_state`, release it,
    charge `cost_usd` (wallet to revenue, one ledger entry) and write the usage record with the
    `record` columns; one statement. IntegrityError: the request was settled already. DataError
    (`aborted_on_purpose`): an account is missing, nothing was written."""
    params: dict[str, Any] = {
        **record,
        "request_id": request_id,
        "organization_id": organization_id,
        "api_key_id": api_key_id,
        "state": reservation_state,
        "cost": cost_usd,
        "negative_cost": -cost_usd,
        "memo": memo[:300],
        "touch_last_used": touch_last_used,
        "last_used_before": last_used_before,
        "now": now,
    }

    def read(row: tuple[Any, ...]) -> Settled:
        record_id, claims, entry_id, _ = row
        return Settled(
            usage_record_id=record_id, claimed=claims == 1, ledger_transaction_id=entry_id
        )

    return Statement(_SETTLE, params, read)
