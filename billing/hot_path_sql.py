"""The request path's reservation and settlement on PostgreSQL, one statement each, for one
request or for several at once.

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
  which aborts it whole; `aborted_on_purpose` is how the caller recognises that.

Several requests (the event loop's requests of the moment, billing/loop_database.py `Batches`)
go as one statement of the same CTEs over a JSON batch (`_RESERVE_MANY`, `_SETTLE_MANY`): each
shared row (a wallet, a spend window, the revenue account) moves once per statement, by the sum
of its requests. Measured: PostgreSQL's CPU per request -55 to -70% at 64 concurrent requests
(it spent most of its time starting, re-checking and committing statements, not changing rows),
the gateway's -40%; for one request the single forms stay, which are cheaper (bench/RESULTS.md).
- Shared rows are locked in one order (`ORDER BY id FOR UPDATE`, spend windows before wallets
  before the revenue account) by both batch forms: two batches never deadlock.
- A batch of reservations holds them in their order while they fit; one that does not is asked
  again alone by the caller (a later, smaller one may fit alone). A batch of settlements is all
  or nothing: when it fails (a request settled already, an account's first use), the caller
  sends its requests again one by one.
- Its lookups are by key (`= ANY(ARRAY(SELECT … FROM input))`), so its one generic plan uses the
  indexes whatever the batch's size (checked with 1M reservations and 100k organisations).

The services fall back to the ORM path for what this does not do (another database, a window's
or an account's first use).
"""

from __future__ import annotations

import functools
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

import orjson
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
    # `text` with its values as `$1`, `$2`, … in the order of `types`: what the server parses.
    numbered: str = field(init=False)

    def __post_init__(self) -> None:
        position = {name: index for index, name in enumerate(self.types, start=1)}
        numbered = re.sub(r"%\((\w+)\)s", lambda match: f"${position[match[1]]}", self.text)
        object.__setattr__(self, "numbered", numbered)

    def prepare_sql(self) -> str:
        return f"PREPARE {self.name} ({', '.join(self.types.values())}) AS {self.numbered}"

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
    read: Callable[[list[tuple[Any, ...]]], _Result]

    def run(self) -> _Result:
        with connection.cursor() as cursor:
            for sql, params in self._sends(connection.connection):
                cursor.execute(sql, params)
            return self.read(cursor.fetchall())

    async def run_on_loop(self, connections: LoopConnections) -> _Result:
        """On the loop's connection, the values bound on the server: psycopg prepares the
        statement itself (at the protocol level, once per session). It forgets a prepared
        statement whose execution failed without deallocating it, and these statements fail
        on purpose (`aborted_on_purpose`): the session is then closed, and its statements
        with it, so none is left behind (a refusal, or an account's first use, is rare)."""
        with as_django_errors():  # connecting included
            async with connections.connection() as session:
                # A raw cursor sends the numbered text as it is: psycopg's cursor would parse
                # `%(name)s` out of the text on every call (uncached past 4 kB, as the
                # settlement is): 0.3 ms of the gateway's CPU per request at c=1.
                cursor = psycopg.AsyncRawCursor(session)
                try:
                    await cursor.execute(
                        self.prepared.numbered,
                        [self.params[name] for name in self.prepared.types],
                        prepare=settings.DATABASE_PREPARED_STATEMENTS,
                    )
                except psycopg.Error:
                    await session.close()
                    raise
                return self.read(await cursor.fetchall())

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


def _bigint(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every integer as a bigint, for the loop's connections: psycopg types each
    by its size, and each mix of types would be prepared as a statement of its own."""
    return {name: Int8(value) if type(value) is int else value for name, value in values.items()}


def _batched(name: str, columns: dict[str, str], ctes: str) -> _Prepared:
    """A statement over a batch of requests: its one parameter is their values as JSON
    (`_batch`), read as the rows of `input` (one per request, with `columns` and its
    `position` in the batch), which `ctes` (what follows `WITH input AS (…),`) use."""
    record = ", ".join(f"{name} {kind}" for name, kind in {"position": "bigint", **columns}.items())
    rows = "SELECT * FROM jsonb_to_recordset(%(batch)s::jsonb) AS input(" + record + ")"  # noqa: S608 (our column names)
    return _Prepared(
        name=name, text=f"\nWITH input AS (\n    {rows}\n), {ctes}", types={"batch": "jsonb"}
    )


def _batch(requests: list[dict[str, Any]]) -> str:
    """The requests' values as the statement's one JSON parameter (decimals and times as
    their text, which PostgreSQL reads back exactly): one value to send, where an array per
    column cost more of the gateway's time in psycopg than the statement itself."""
    return orjson.dumps(
        [{**values, "position": position} for position, values in enumerate(requests)],
        default=str,  # Decimal; times are written by orjson itself, as RFC 3339
    ).decode()


# One reservation's values, with their SQL types: the single statement's parameters, and the
# input columns of the batch.
_RESERVATION_COLUMNS = {
    "request_id": "text",
    "organization_id": "bigint",
    "api_key_id": "bigint",
    "amount": "numeric",
    "capped": "boolean",
    "window_start": "timestamptz",
    "cap_usd": "numeric",
    "now": "timestamptz",
}

_RESERVE_ONE = _Prepared(
    name="sb_reserve",
    text=f"""
WITH spend_window AS (
    UPDATE {_KEYSPEND} SET reserved_usd = reserved_usd + %(amount)s
    WHERE %(capped)s AND api_key_id = %(api_key_id)s AND window_start = %(window_start)s
      AND spent_usd + reserved_usd + %(amount)s <= %(cap_usd)s
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
    types=_RESERVATION_COLUMNS,
)


_RESERVE_MANY = _batched(
    "sb_reserve_many",
    _RESERVATION_COLUMNS,
    f"""windows AS (
    -- Rows shared by several requests are locked in one order (by id) by every reservation
    -- and settlement, so two statements that each hold some of them never deadlock. Locked,
    -- a row reads as last committed (READ COMMITTED), whatever this statement's snapshot.
    SELECT spend.id, spend.api_key_id, spend.window_start,
        spend.spent_usd + spend.reserved_usd AS used
    FROM {_KEYSPEND} AS spend
    WHERE spend.api_key_id = ANY(ARRAY(SELECT api_key_id FROM input))
      AND (spend.api_key_id, spend.window_start) IN (
        SELECT api_key_id, window_start FROM input WHERE capped
      )
    ORDER BY spend.id FOR UPDATE
), window_fits AS (
    -- In a window, the requests fit in their order while the sum of the holds does (a request
    -- after one that did not fit is refused here too: the caller asks again for it alone).
    SELECT input.position, windows.id AS window_id,
        windows.used + sum(input.amount) OVER (
            PARTITION BY windows.id ORDER BY input.position
        ) <= input.cap_usd AS fits
    FROM input JOIN windows USING (api_key_id, window_start)
    WHERE input.capped
), wallets AS (
    SELECT account.id, account.organization_id,
        account.balance_usd - account.reserved_usd AS available
    FROM {_ACCOUNT} AS account
    WHERE account.kind = 'wallet'
      AND account.organization_id = ANY(ARRAY(SELECT organization_id FROM input))
      AND (SELECT count(*) FROM windows) >= 0  -- after the windows
    ORDER BY account.id FOR UPDATE
), wallet_fits AS (
    -- Likewise in a wallet, among the requests their windows let through.
    SELECT input.position, wallets.id AS wallet_id,
        sum(input.amount) OVER (
            PARTITION BY wallets.id ORDER BY input.position
        ) <= wallets.available AS fits
    FROM input
        JOIN wallets USING (organization_id)
        LEFT JOIN window_fits USING (position)
    WHERE NOT input.capped OR window_fits.fits
), held AS (
    SELECT input.*, wallet_fits.wallet_id, window_fits.window_id
    FROM input
        JOIN wallet_fits USING (position)
        LEFT JOIN window_fits USING (position)
    WHERE wallet_fits.fits
), spend_window AS (
    UPDATE {_KEYSPEND} AS spend SET reserved_usd = spend.reserved_usd + taken.amount
    FROM (
        SELECT window_id, sum(amount) AS amount FROM held
        WHERE window_id IS NOT NULL GROUP BY window_id
    ) AS taken
    WHERE spend.id = taken.window_id
    RETURNING spend.id
), wallet AS (
    UPDATE {_ACCOUNT} AS account SET reserved_usd = account.reserved_usd + taken.amount
    FROM (SELECT wallet_id, sum(amount) AS amount FROM held GROUP BY wallet_id) AS taken
    WHERE account.id = taken.wallet_id
      AND (SELECT count(*) FROM spend_window) >= 0  -- after the spend windows
    RETURNING account.id
), hold AS (
    INSERT INTO {_RESERVATION} (
        request_id, organization_id, api_key_id, amount_usd, spend_window_start, state,
        created_at, checkpoint_model, checkpoint_provider, checkpoint_upstream_model
    )
    SELECT request_id, organization_id, api_key_id, amount,
        CASE WHEN capped THEN window_start END, 'held', now, '', '', ''
    FROM held
    WHERE (SELECT count(*) FROM wallet) >= 0  -- after the wallets
    RETURNING request_id
)
SELECT hold.request_id IS NOT NULL, window_fits.fits
FROM input
    LEFT JOIN hold USING (request_id)
    LEFT JOIN window_fits USING (position)
ORDER BY input.position
""",  # noqa: S608 (table names come from the models; every value is a parameter)
)


@dataclass(frozen=True, slots=True)
class Reserved:
    """What the reservation statement did for one request."""

    held: bool  # the reservation was made (wallet and spend window held)
    window_refused: bool  # a capped key's window did not fit the amount (nothing was held)
    window_missing: bool  # a capped key's window has no row yet (the ORM path makes it)


def reservation(
    *,
    request_id: str,
    organization_id: int,
    api_key_id: int,
    amount_usd: Decimal,
    cap_usd: Decimal | None,
    window_start: datetime | None,
    now: datetime,
) -> dict[str, Any]:
    """One request's values for `reserve`: hold `amount_usd` of the wallet and, when `cap_usd`
    is given, of the key's spend window starting at `window_start`."""
    return {
        "request_id": request_id,
        "organization_id": organization_id,
        "api_key_id": api_key_id,
        "amount": amount_usd,
        "capped": cap_usd is not None,
        "window_start": window_start,
        "cap_usd": cap_usd if cap_usd is not None else Decimal(0),
        "now": now,
    }


def reserve(reservations: list[dict[str, Any]]) -> Statement[list[Reserved]]:
    """Make reservations (each one's values from `reservation`); the answer is in their order.

    One request: `_RESERVE_ONE`. A refusal by its wallet after its spend window fitted raises
    DataError (`aborted_on_purpose`): the caller reports InsufficientCredit.

    Several: `_RESERVE_MANY`, which refuses a request that does not fit after the ones before
    it in the list (alone, it might have fitted: the caller asks again for it alone), and
    never aborts on purpose.
    """
    if len(reservations) == 1:
        (one,) = reservations

        def read_one(rows: list[tuple[Any, ...]]) -> list[Reserved]:
            ((windows, holds, window_exists, _),) = rows
            capped = one["capped"]
            return [
                Reserved(
                    held=holds == 1,
                    window_refused=capped and windows == 0 and window_exists,
                    window_missing=capped and not window_exists,
                )
            ]

        return Statement(_RESERVE_ONE, _bigint(one), read_one)

    def read(rows: list[tuple[Any, ...]]) -> list[Reserved]:
        return [
            Reserved(
                held=held,
                window_refused=window_fits is False,
                window_missing=values["capped"] and window_fits is None,
            )
            for (held, window_fits), values in zip(rows, reservations, strict=True)
        ]

    return Statement(_RESERVE_MANY, {"batch": _batch(reservations)}, read)


# One settlement's values, with their SQL types: the single statement's parameters, and the
# input columns of the batch.
_SETTLEMENT_COLUMNS = {
    "request_id": "text",
    "state": "text",
    "cost": "numeric",
    "organization_id": "bigint",
    "api_key_id": "bigint",
    "memo": "text",
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
    "now": "timestamptz",
}

# The usage record's insert, up to its values: the same columns for one settlement and many.
_INSERT_USAGE_RECORD = f"""INSERT INTO {_USAGE} (
        request_id, organization_id, api_key_id, model, provider, upstream_model, attempts,
        status, http_status, input_tokens, output_tokens, cached_input_tokens,
        cache_write_input_tokens, usage_source, cost_usd, latency_ms, time_to_first_token_ms,
        ledger_transaction_id, created_at
    )"""

_SETTLE_ONE = _Prepared(
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
    SELECT entry.id, wallet.id, -%(cost)s
    FROM entry, wallet WHERE wallet.organization_id = %(organization_id)s
    UNION ALL
    SELECT entry.id, revenue.id, %(cost)s FROM entry, revenue
    RETURNING id
), record AS (
    {_INSERT_USAGE_RECORD}
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
    types=_SETTLEMENT_COLUMNS,
)


_SETTLE_MANY = _batched(
    "sb_settle_many",
    _SETTLEMENT_COLUMNS,
    f"""claim AS (
    UPDATE {_RESERVATION} AS held SET state = input.state, resolved_at = input.now
    FROM input
    WHERE held.request_id = ANY(ARRAY(SELECT request_id FROM input))
      AND held.request_id = input.request_id AND held.state = 'held'
    RETURNING held.request_id, held.organization_id, held.amount_usd, held.api_key_id,
        held.spend_window_start
), swept AS (
    -- A hold the sweeper voided before its settlement came (it waited in the spool through
    -- an outage longer than the sweep bound): nothing to release, but the charge still counts
    -- in the spend window it was reserved in. (This statement's snapshot shows a hold it
    -- claims as still held, so a claimed hold is never counted twice.)
    SELECT voided.request_id, voided.api_key_id, voided.spend_window_start
    FROM {_RESERVATION} AS voided
    WHERE voided.request_id = ANY(ARRAY(SELECT request_id FROM input)) AND voided.state = 'voided'
), resolved AS (
    SELECT api_key_id, spend_window_start, sum(held) AS held, sum(spent) AS spent
    FROM (
        SELECT claim.api_key_id, claim.spend_window_start, claim.amount_usd AS held,
            input.cost AS spent
        FROM claim JOIN input USING (request_id)
        UNION ALL
        SELECT swept.api_key_id, swept.spend_window_start, 0, input.cost
        FROM swept JOIN input USING (request_id)
    ) AS each_hold
    WHERE spend_window_start IS NOT NULL
    GROUP BY api_key_id, spend_window_start
), windows_locked AS (
    -- Rows shared by several requests are locked in one order (by id) by every settlement
    -- and reservation, so two statements that each hold some of them never deadlock.
    SELECT spend.id FROM {_KEYSPEND} AS spend
    WHERE (spend.api_key_id, spend.window_start) IN (
        SELECT api_key_id, spend_window_start FROM resolved
    )
    ORDER BY spend.id FOR UPDATE
), spend_window AS (
    UPDATE {_KEYSPEND} AS spend
    SET reserved_usd = spend.reserved_usd - resolved.held,
        spent_usd = spend.spent_usd + resolved.spent
    FROM resolved
    WHERE spend.api_key_id = resolved.api_key_id
      AND spend.window_start = resolved.spend_window_start
      AND (SELECT count(*) FROM windows_locked) >= 0  -- after the lock
    RETURNING spend.id
), moved AS (
    -- Each wallet moves once: the charges of its organisation's requests, and the release
    -- of the holds it made (always the request's own organisation's, by construction).
    SELECT organization_id, sum(charged) AS charged, sum(released) AS released
    FROM (
        SELECT organization_id, cost AS charged, 0 AS released FROM input WHERE cost > 0
        UNION ALL
        SELECT organization_id, 0, amount_usd FROM claim
    ) AS each_move
    GROUP BY organization_id
), wallets_locked AS (
    SELECT account.id FROM {_ACCOUNT} AS account
    WHERE account.kind = 'wallet'
      -- The requests' organisations (a hold made by another's wallet, never the case, is left
      -- to the ORM path: the check below aborts the statement).
      AND account.organization_id = ANY(ARRAY(SELECT organization_id FROM input))
      AND account.organization_id IN (SELECT organization_id FROM moved)
      AND (SELECT count(*) FROM spend_window) >= 0  -- after the spend windows
    ORDER BY account.id FOR UPDATE
), wallet AS (
    UPDATE {_ACCOUNT} AS account
    SET balance_usd = account.balance_usd - moved.charged,
        reserved_usd = account.reserved_usd - moved.released
    FROM moved
    WHERE account.id IN (SELECT id FROM wallets_locked)
      AND account.organization_id = moved.organization_id
    RETURNING account.id, account.organization_id
), revenue AS (
    SELECT id FROM {_ACCOUNT} WHERE organization_id IS NULL AND kind = 'revenue'
), charged AS (
    -- The ledger entry of each charged request, its id drawn here to tie its postings and
    -- its usage record to it.
    SELECT request_id, organization_id, cost, memo, now,
        nextval(pg_get_serial_sequence('{_ENTRY}', 'id')) AS entry_id
    FROM input WHERE cost > 0
), entry AS (
    INSERT INTO {_ENTRY} (id, kind, memo, created_at)
    SELECT entry_id, 'usage', memo, now FROM charged
    RETURNING id
), postings AS (
    INSERT INTO {_POSTING} (transaction_id, account_id, amount_usd)
    SELECT charged.entry_id, wallet.id, -charged.cost
    FROM charged JOIN wallet USING (organization_id)
    UNION ALL
    SELECT charged.entry_id, revenue.id, charged.cost FROM charged, revenue
    RETURNING id
), record AS (
    {_INSERT_USAGE_RECORD}
    SELECT input.request_id, input.organization_id, input.api_key_id, input.model,
        input.provider, input.upstream_model, input.attempts, input.status, input.http_status,
        input.input_tokens, input.output_tokens, input.cached_input_tokens,
        input.cache_write_input_tokens, input.usage_source, input.cost, input.latency_ms,
        input.time_to_first_token_ms, charged.entry_id, input.now
    FROM input LEFT JOIN charged USING (request_id)
    RETURNING id, request_id
), revenue_moved AS (
    -- Last: the one row every organisation's settlement updates is locked for the shortest
    -- time.
    UPDATE {_ACCOUNT} SET balance_usd = balance_usd + (SELECT sum(cost) FROM charged)
    WHERE id = (SELECT id FROM revenue) AND EXISTS (SELECT 1 FROM charged)
      AND (SELECT count(*) FROM record) >= 0
    RETURNING id
), keys_used AS (
    SELECT api_key_id, max(now) AS now, max(last_used_before) AS last_used_before
    FROM input WHERE touch_last_used GROUP BY api_key_id
), last_used AS (
    UPDATE {_API_KEY} AS api_key SET last_used_at = keys_used.now
    FROM keys_used
    WHERE api_key.id = ANY(ARRAY(SELECT api_key_id FROM input))
      AND api_key.id = keys_used.api_key_id
      AND (api_key.last_used_at IS NULL OR api_key.last_used_at < keys_used.last_used_before)
    RETURNING api_key.id
)
SELECT
    record.request_id,
    record.id,
    claim.request_id IS NOT NULL,
    charged.entry_id,
    -- A charge needs both accounts (the first of each is made by the ORM path), and a claimed
    -- hold its wallet: without them, nothing is committed.
    1 / CASE
        WHEN (SELECT count(*) FROM postings) <> 2 * (SELECT count(*) FROM charged) THEN 0
        WHEN (SELECT count(*) FROM revenue_moved) <> LEAST((SELECT count(*) FROM charged), 1)
        THEN 0
        WHEN (SELECT count(*) FROM wallet) <> (SELECT count(*) FROM moved) THEN 0
        ELSE 1
    END
FROM record
    LEFT JOIN claim USING (request_id)
    LEFT JOIN charged USING (request_id)
""",  # noqa: S608 (table names come from the models; every value is a parameter)
)


@dataclass(frozen=True, slots=True)
class Settled:
    usage_record_id: int
    claimed: bool  # a held reservation was resolved
    ledger_transaction_id: int | None


def settlement(
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
) -> dict[str, Any]:
    """One request's values for `settle`: claim its held reservation (if any) into
    `reservation_state`, release it, charge `cost_usd` (wallet to revenue, one ledger entry)
    and write the usage record with the `record` columns."""
    return {
        **record,
        "request_id": request_id,
        "organization_id": organization_id,
        "api_key_id": api_key_id,
        "state": reservation_state,
        "cost": cost_usd,
        "memo": memo[:300],
        "touch_last_used": touch_last_used,
        "last_used_before": last_used_before,
        "now": now,
    }


def settle(settlements: list[dict[str, Any]]) -> Statement[list[Settled]]:
    """Settle requests (each one's values from `settlement`), all or none, in one statement
    (`_SETTLE_ONE` for one, `_SETTLE_MANY` for several); the answer is in their order.
    IntegrityError: a request was settled already (or is given twice). DataError
    (`aborted_on_purpose`): an account is missing. Either way nothing was written."""
    if len(settlements) == 1:
        (values,) = settlements

        def read_one(rows: list[tuple[Any, ...]]) -> list[Settled]:
            ((record_id, claims, entry_id, _),) = rows
            return [Settled(record_id, claimed=claims == 1, ledger_transaction_id=entry_id)]

        return Statement(_SETTLE_ONE, _bigint(values), read_one)

    order = [values["request_id"] for values in settlements]

    def read(rows: list[tuple[Any, ...]]) -> list[Settled]:
        settled = {
            request_id: Settled(record_id, claimed=claimed, ledger_transaction_id=entry_id)
            for request_id, record_id, claimed, entry_id, _ in rows
        }
        return [settled[request_id] for request_id in order]

    return Statement(_SETTLE_MANY, {"batch": _batch(settlements)}, read)
