"""Writes to the ledger and the usage records. The only module that creates postings."""

from __future__ import annotations

import functools
import logging
import time
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NoReturn, TypeVar

from django.db import DatabaseError, DataError, IntegrityError, transaction
from django.db.models import F, Field, Model, Q
from django.db.models.base import ModelState
from django.db.models.signals import post_init, pre_init
from django.utils import timezone

from billing import hot_path_sql
from billing.loop_database import LoopConnections, loop_connections
from billing.models import (
    GRANT_REFERENCE_MAX_LENGTH,
    Account,
    GrantReference,
    KeySpend,
    LedgerTransaction,
    Posting,
    Reservation,
    SpendCap,
    UsageRecord,
)
from billing.money import USD_LIMIT, ZERO_USD, Price, format_usd, usage_cost_usd
from portal.models import ApiKey, Organization

logger = logging.getLogger(__name__)

# An API key's last_used_at is precise to this much.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class BillingError(Exception):
    """A billing request that cannot be carried out; the message says why."""


class InsufficientCredit(BillingError):
    """The wallet's available credit does not cover the request's worst-case cost."""


class SpendCapExceeded(BillingError):
    """The key's spend in this window, plus the request's worst case, would pass its cap."""

    def __init__(self, message: str, *, resets_at: datetime | None) -> None:
        super().__init__(message)
        self.resets_at = resets_at


@dataclass(frozen=True, slots=True)
class CapTerms:
    """An API key's spend cap, as the gateway caches it with the key."""

    amount_usd: Decimal
    window: SpendCap.Window


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# Each kind of window's bounds last asked for: the next request's `now` is almost always in it.
_current_windows: dict[str, tuple[datetime, datetime | None]] = {}


def spend_window_bounds(window: SpendCap.Window, now: datetime) -> tuple[datetime, datetime | None]:
    """The UTC start of the cap window containing `now`, and when it ends (None: never)."""
    current = _current_windows.get(window)
    if current is not None and current[0] <= now and (current[1] is None or now < current[1]):
        return current
    bounds = _window_bounds(window, now)
    _current_windows[window] = bounds
    return bounds


def _window_bounds(window: SpendCap.Window, now: datetime) -> tuple[datetime, datetime | None]:
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == SpendCap.Window.DAY:
        return day, day + timedelta(days=1)
    if window == SpendCap.Window.WEEK:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(weeks=1)
    if window == SpendCap.Window.MONTH:
        start = day.replace(day=1)
        following = (start + timedelta(days=32)).replace(day=1)
        return start, following
    return _EPOCH, None


def _system_account(kind: Account.Kind) -> Account:
    account, _ = Account.objects.get_or_create(organization=None, kind=kind)
    return account


def wallet_get_or_create(*, organization_id: int) -> Account:
    """The organisation's wallet, created empty on first use.

    get_or_create survives a concurrent first use: the loser's insert fails on the unique
    constraint inside a savepoint and it reads the winner's row.
    """
    account, _ = Account.objects.get_or_create(
        organization_id=organization_id, kind=Account.Kind.WALLET
    )
    return account


def _post(
    *, kind: LedgerTransaction.Kind, memo: str, legs: list[tuple[Account, Decimal]]
) -> LedgerTransaction:
    """Write one balanced transaction and move the balances it touches.

    Must run inside `transaction.atomic()`: postings and balances commit together or not at all.
    """
    if sum((amount for _, amount in legs), ZERO_USD) != ZERO_USD:
        raise BillingError("postings of a transaction must sum to zero")
    # Refused here rather than by the database (a DataError at the UPDATE below). The balances
    # were read moments ago: a concurrent posting that wins the race is still refused there.
    if any(abs(account.balance_usd + amount) >= USD_LIMIT for account, amount in legs):
        raise BillingError("this would move a balance past the largest amount the ledger holds")
    entry = LedgerTransaction.objects.create(kind=kind, memo=memo[:300])
    Posting.objects.bulk_create(
        Posting(transaction=entry, account=account, amount_usd=amount) for account, amount in legs
    )
    for account, amount in legs:
        # F() makes the database add, so concurrent postings to one account never lose an update.
        Account.objects.filter(pk=account.pk).update(balance_usd=F("balance_usd") + amount)
    return entry


def _charge_usage(
    *, organization_id: int, cost_usd: Decimal, memo: str, released_usd: Decimal = ZERO_USD
) -> LedgerTransaction | None:
    """Move a request's cost from the wallet to revenue, releasing `released_usd` of the
    wallet's hold in the same UPDATE; the ledger entry, or None when it cost nothing.

    Must run inside `transaction.atomic()`.
    """
    if cost_usd <= ZERO_USD and released_usd <= ZERO_USD:
        return None
    wallet_id = _move_account(
        organization_id=organization_id,
        kind=Account.Kind.WALLET,
        balance_usd=-cost_usd,
        reserved_usd=-released_usd,
    )
    if cost_usd <= ZERO_USD:
        return None
    entry = LedgerTransaction.objects.create(kind=LedgerTransaction.Kind.USAGE, memo=memo[:300])
    revenue_id = _move_account(
        organization_id=None, kind=Account.Kind.REVENUE, balance_usd=cost_usd
    )
    Posting.objects.bulk_create(
        [
            Posting(transaction=entry, account_id=wallet_id, amount_usd=-cost_usd),
            Posting(transaction=entry, account_id=revenue_id, amount_usd=cost_usd),
        ]
    )
    return entry


def credit_grant(
    *, organization: Organization, amount_usd: Decimal, reason: str
) -> LedgerTransaction:
    """Give an organisation credit from the grants account (operator credit, promotions)."""
    if amount_usd <= ZERO_USD:
        raise BillingError("a grant must be a positive amount")
    if not reason.strip():
        raise BillingError("a grant needs a reason")
    return _grants_transfer(
        organization=organization,
        to_wallet_usd=amount_usd,
        memo=reason.strip(),
        kind=LedgerTransaction.Kind.GRANT,
    )


def credit_grant_once(
    *, organization: Organization, amount_usd: Decimal, reason: str, reference: str
) -> tuple[LedgerTransaction, bool]:
    """`credit_grant` at most once per organisation and `reference`: the grant's transaction
    and True when granted now; the first grant's and False when the reference was used before
    for the same amount. A reference used for another amount is a BillingError (a mistake,
    not a repeat).

    A repeat is found before anything is written; the unique (organisation, reference) row,
    written in the grant's transaction, settles concurrent grants: one commits, the others
    undo theirs.
    """
    reference = reference.strip()
    if not reference:
        raise BillingError("a reference cannot be empty")
    if len(reference) > GRANT_REFERENCE_MAX_LENGTH:
        raise BillingError(f"a reference is at most {GRANT_REFERENCE_MAX_LENGTH} characters")
    if not GrantReference.objects.filter(organization=organization, reference=reference).exists():
        try:
            with transaction.atomic():
                entry = credit_grant(
                    organization=organization, amount_usd=amount_usd, reason=reason
                )
                GrantReference.objects.create(
                    organization=organization,
                    reference=reference,
                    amount_usd=amount_usd,
                    ledger_transaction=entry,
                )
            return entry, True
        except IntegrityError:
            pass  # a concurrent run under this reference committed first: ours is undone
    first = GrantReference.objects.select_related("ledger_transaction").get(
        organization=organization, reference=reference
    )
    if first.amount_usd != amount_usd:
        raise BillingError(
            f"reference {reference!r} was already used for a grant of "
            f"{format_usd(first.amount_usd)} USD (transaction #{first.ledger_transaction_id})"
        )
    return first.ledger_transaction, False


def credit_clawback(
    *, organization: Organization, amount_usd: Decimal, reason: str
) -> LedgerTransaction:
    """Take credit back from a wallet into the grants account (an operator's correction).

    Unlike a request, a clawback is not limited by the available credit: the wallet may go
    negative, and then no request is admitted until it is topped up again.
    """
    if amount_usd <= ZERO_USD:
        raise BillingError("a clawback must be a positive amount")
    if not reason.strip():
        raise BillingError("a clawback needs a reason")
    return _grants_transfer(
        organization=organization,
        to_wallet_usd=-amount_usd,
        memo=reason.strip(),
        kind=LedgerTransaction.Kind.CLAWBACK,
    )


def _grants_transfer(
    *,
    organization: Organization,
    to_wallet_usd: Decimal,
    memo: str,
    kind: LedgerTransaction.Kind,
) -> LedgerTransaction:
    """Move money between the grants account and a wallet (negative: back to grants)."""
    with transaction.atomic():
        wallet = wallet_get_or_create(organization_id=organization.pk)
        return _post(
            kind=kind,
            memo=memo,
            legs=[(wallet, to_wallet_usd), (_system_account(Account.Kind.GRANTS), -to_wallet_usd)],
        )


def credit_reserve(
    *,
    request_id: str,
    organization_id: int,
    api_key_id: int,
    amount_usd: Decimal,
    spend_cap: CapTerms | None = None,
    now: datetime | None = None,
) -> Reservation:
    """Hold `amount_usd` of the organisation's wallet (and of the key's spend cap, if it has
    one) for a request; raises InsufficientCredit or SpendCapExceeded when it does not fit.

    Each hold is one conditional UPDATE (`available >= amount`): the database serialises
    concurrent holds on the row and re-checks the condition against the committed values, so
    no mix of processes and requests can hold more than the wallet (or the cap) allows.
    """
    if amount_usd < ZERO_USD:
        raise BillingError("a reservation cannot be negative")
    now = now or timezone.now()
    if hot_path_sql.available():
        reservation = _OneStatementReservation(
            request_id=request_id,
            organization_id=organization_id,
            api_key_id=api_key_id,
            amount_usd=amount_usd,
            spend_cap=spend_cap,
            now=now,
        ).reserve()
        if reservation is not None:
            return reservation
    window_start = None
    with transaction.atomic():
        if spend_cap is not None:
            window_start, resets_at = spend_window_bounds(spend_cap.window, now)
            window = KeySpend.objects.filter(api_key_id=api_key_id, window_start=window_start)
            fits = (
                window.alias(used=F("spent_usd") + F("reserved_usd"))
                .filter(used__lte=spend_cap.amount_usd - amount_usd)
                .update(reserved_usd=F("reserved_usd") + amount_usd)
            )
            # The window's row is made by its first request only: the common case is one
            # UPDATE, not a lookup and an UPDATE.
            if (
                fits == 0
                and KeySpend.objects.get_or_create(
                    api_key_id=api_key_id, window_start=window_start
                )[1]
            ):
                fits = (
                    window.alias(used=F("spent_usd") + F("reserved_usd"))
                    .filter(used__lte=spend_cap.amount_usd - amount_usd)
                    .update(reserved_usd=F("reserved_usd") + amount_usd)
                )
            if fits != 1:
                raise SpendCapExceeded(
                    "this key's spend cap does not cover this request", resets_at=resets_at
                )
        held = (
            Account.objects.filter(organization_id=organization_id, kind=Account.Kind.WALLET)
            .alias(available=F("balance_usd") - F("reserved_usd"))
            .filter(available__gte=amount_usd)
            .update(reserved_usd=F("reserved_usd") + amount_usd)
        )
        if held != 1:
            raise InsufficientCredit("the wallet's available credit does not cover this request")
        return Reservation.objects.create(
            request_id=request_id,
            organization_id=organization_id,
            api_key_id=api_key_id,
            amount_usd=amount_usd,
            spend_window_start=window_start,
        )


async def credit_reserve_on_loop(
    *,
    request_id: str,
    organization_id: int,
    api_key_id: int,
    amount_usd: Decimal,
    spend_cap: CapTerms | None = None,
) -> Reservation | None:
    """credit_reserve for an event loop (the gateway): the same one statement, on the loop's
    own connections (billing/loop_database.py), with no thread. None when only credit_reserve
    can do it (not PostgreSQL, the loop's connections resting after a failure, or the key's
    spend window has no row yet), having held nothing."""
    if amount_usd < ZERO_USD:
        raise BillingError("a reservation cannot be negative")
    connections = loop_connections() if hot_path_sql.available() else None
    if connections is None:
        return None
    return await _OneStatementReservation(
        request_id=request_id,
        organization_id=organization_id,
        api_key_id=api_key_id,
        amount_usd=amount_usd,
        spend_cap=spend_cap,
        now=timezone.now(),
    ).reserve_on_loop(connections)


async def _send_reservations(
    connections: LoopConnections, reservations: list[dict[str, Any]]
) -> list[hot_path_sql.Reserved]:
    """Reservations made in one statement; one refused there is asked again alone (the
    statement refuses every request after the first that does not fit in a wallet or window,
    while alone a later, smaller one may fit)."""
    reserved = await hot_path_sql.reserve(reservations).run_on_loop(connections)
    if len(reservations) > 1:
        for position, outcome in enumerate(reserved):
            if not outcome.held and not outcome.window_missing:
                # Refused by the wallet alone too (aborted on purpose), or the retry failed:
                # the batch's answer stands (and the batch's holds are kept).
                with suppress(DatabaseError):
                    (reserved[position],) = await hot_path_sql.reserve(
                        [reservations[position]]
                    ).run_on_loop(connections)
    return reserved


class _OneStatementReservation:
    """credit_reserve as one PostgreSQL statement (billing/hot_path_sql.py), and what its
    outcome means: the Reservation, a refusal, or None when the key's spend window has no
    row yet (the ORM path makes it), having held nothing."""

    def __init__(
        self,
        *,
        request_id: str,
        organization_id: int,
        api_key_id: int,
        amount_usd: Decimal,
        spend_cap: CapTerms | None,
        now: datetime,
    ) -> None:
        window_start: datetime | None = None
        self.resets_at: datetime | None = None
        if spend_cap is not None:
            window_start, self.resets_at = spend_window_bounds(spend_cap.window, now)
        self.values = hot_path_sql.reservation(
            request_id=request_id,
            organization_id=organization_id,
            api_key_id=api_key_id,
            amount_usd=amount_usd,
            cap_usd=spend_cap.amount_usd if spend_cap is not None else None,
            window_start=window_start,
            now=now,
        )

    def reserve(self) -> Reservation | None:
        """On Django's connection (a sync caller, in its transaction if it has one)."""
        try:
            # A savepoint only inside a caller's transaction (see _settle_in_one_statement).
            with (
                transaction.atomic()
                if transaction.get_connection().in_atomic_block
                else nullcontext()
            ):
                (reserved,) = hot_path_sql.reserve([self.values]).run()
        except DataError as error:
            self.refuse(error)
        return self.reservation(reserved)

    async def reserve_on_loop(self, connections: LoopConnections) -> Reservation | None:
        """On the loop's connections, with the loop's other requests of the moment."""
        try:
            reserved = await connections.batches(_send_reservations).run(self.values)
        except DataError as error:
            self.refuse(error)
        return self.reservation(reserved)

    def refuse(self, error: DataError) -> NoReturn:
        """Raise what a DataError of the statement means: InsufficientCredit when the wallet
        refused after the window fitted (the statement aborted on purpose), else the error."""
        if hot_path_sql.aborted_on_purpose(error):
            raise InsufficientCredit(
                "the wallet's available credit does not cover this request"
            ) from None
        raise error

    def reservation(self, reserved: hot_path_sql.Reserved) -> Reservation | None:
        if reserved.window_missing:
            return None
        if reserved.window_refused:
            raise SpendCapExceeded(
                "this key's spend cap does not cover this request", resets_at=self.resets_at
            )
        if not reserved.held:
            raise InsufficientCredit("the wallet's available credit does not cover this request")
        values = self.values
        return _as_stored(
            Reservation,
            {
                "request_id": values["request_id"],
                "organization_id": values["organization_id"],
                "api_key_id": values["api_key_id"],
                "amount_usd": values["amount"],
                "spend_window_start": values["window_start"],
                "created_at": values["now"],
            },
        )


def _release(*, request_id: str, state: Reservation.State, spent_usd: Decimal = ZERO_USD) -> bool:
    """Move a held reservation to `state` and give its hold back to the wallet (and to the
    key's spend window, which is charged `spent_usd`), exactly once.

    Returns False when it was not held (already settled or voided, or never made). Must run
    inside `transaction.atomic()`.
    """
    claim = _claim(request_id=request_id, state=state, spent_usd=spent_usd)
    if claim is None:
        return False
    organization_id, amount_usd = claim
    Account.objects.filter(organization_id=organization_id, kind=Account.Kind.WALLET).update(
        reserved_usd=F("reserved_usd") - amount_usd
    )
    return True


def _claim(
    *, request_id: str, state: Reservation.State, spent_usd: Decimal
) -> tuple[int, Decimal] | None:
    """`_release` but for the wallet: move the reservation to `state` and settle the key's
    spend window; returns the organisation and the amount its wallet still holds, or None
    when the reservation was not held. The caller releases the wallet's hold, in the same
    transaction."""
    held = (
        Reservation.objects.filter(request_id=request_id, state=Reservation.State.HELD)
        .values_list("organization_id", "amount_usd", "api_key_id", "spend_window_start")
        .first()
    )
    if held is None:
        return None
    organization_id, amount_usd, api_key_id, window_start = held
    # The conditional UPDATE is the claim: of two concurrent resolvers, the second waits on
    # the row lock, re-checks `state = held` against the committed row and changes nothing.
    claimed = Reservation.objects.filter(
        request_id=request_id, state=Reservation.State.HELD
    ).update(state=state, resolved_at=timezone.now())
    if claimed != 1:
        return None
    if window_start is not None:
        KeySpend.objects.filter(api_key_id=api_key_id, window_start=window_start).update(
            reserved_usd=F("reserved_usd") - amount_usd, spent_usd=F("spent_usd") + spent_usd
        )
    return organization_id, amount_usd


def _count_in_swept_window(*, request_id: str, spent_usd: Decimal) -> None:
    """Count a charge in the key's spend window when the sweeper voided the request's hold
    before its settlement came (it waited in the spool through an outage longer than the
    sweep bound): nothing is released, but the usage was spent in that window. Must run
    inside the settlement's transaction (its usage record makes it happen once)."""
    swept = (
        Reservation.objects.filter(request_id=request_id, state=Reservation.State.VOIDED)
        .exclude(spend_window_start=None)
        .values_list("api_key_id", "spend_window_start")
        .first()
    )
    if swept is not None and spent_usd > ZERO_USD:
        api_key_id, window_start = swept
        assert window_start is not None  # noqa: S101 (excluded above)
        KeySpend.objects.filter(api_key_id=api_key_id, window_start=window_start).update(
            spent_usd=F("spent_usd") + spent_usd
        )


def reservation_void(*, request_id: str) -> bool:
    """Release a request's hold without charging (it failed before producing anything).

    Returns False when there was nothing held to release.
    """
    with transaction.atomic():
        return _release(request_id=request_id, state=Reservation.State.VOIDED)


def reservation_checkpoint(
    *,
    request_id: str,
    model: str,
    provider: str,
    upstream_model: str,
    input_tokens: int,
    output_tokens: int,
    price: Price,
) -> bool:
    """Write a running stream's usage so far onto its held reservation (one UPDATE).

    If the process dies before the stream settles, `reservations_sweep` charges this instead
    of voiding the hold, so a crash loses at most the tokens since the last checkpoint.
    Returns False when the reservation is no longer held (nothing to protect any more).
    """
    cost_usd = usage_cost_usd(price=price, input_tokens=input_tokens, output_tokens=output_tokens)
    return (
        Reservation.objects.filter(request_id=request_id, state=Reservation.State.HELD).update(
            checkpoint_model=model,
            checkpoint_provider=provider,
            checkpoint_upstream_model=upstream_model,
            checkpoint_input_tokens=input_tokens,
            checkpoint_output_tokens=output_tokens,
            checkpoint_cost_usd=cost_usd,
            checkpointed_at=timezone.now(),
        )
        == 1
    )


def reservations_sweep(*, older_than: timedelta) -> int:
    """Resolve reservations left `held` longer than `older_than` by a process that died.

    Each is settled if its usage record exists (the charge is already in the ledger); settled
    and charged from its checkpoint if it has one (a stream cut short by the crash: usage
    record `interrupted`, `estimated`, charged at most the amount held); voided otherwise.
    Exactly once, even with several sweepers or a late settle of the same request. Returns
    how many were resolved.
    """
    cutoff = timezone.now() - older_than
    stale = list(
        Reservation.objects.filter(state=Reservation.State.HELD, created_at__lt=cutoff)
        .order_by("created_at")
        .values_list("request_id", flat=True)[:1000]
    )
    resolved = 0
    for request_id in stale:
        with transaction.atomic():
            recorded = UsageRecord.objects.filter(request_id=request_id).exists()
            reservation = Reservation.objects.filter(
                request_id=request_id, state=Reservation.State.HELD
            ).first()
            if reservation is None:
                continue
            if recorded:
                resolved += _release(request_id=request_id, state=Reservation.State.SETTLED)
            elif reservation.checkpoint_cost_usd is None:
                resolved += _release(request_id=request_id, state=Reservation.State.VOIDED)
            else:
                resolved += _settle_from_checkpoint(
                    reservation, checkpoint_cost_usd=reservation.checkpoint_cost_usd
                )
    return resolved


def _settle_from_checkpoint(reservation: Reservation, *, checkpoint_cost_usd: Decimal) -> bool:
    """Charge a dead stream's last checkpoint and record it; False if another resolver won.

    Must run inside `transaction.atomic()`. The claim comes first: a live settle of the same
    request then finds nothing held, and its usage record collides with this one on the unique
    request id, so the usage is charged once whichever commits first.
    """
    # The checkpoint prices an estimate; the hold is what the request was allowed to cost.
    cost_usd = min(checkpoint_cost_usd, reservation.amount_usd)
    claim = _claim(
        request_id=reservation.request_id, state=Reservation.State.SETTLED, spent_usd=cost_usd
    )
    if claim is None:
        return False
    held_by, held_usd = claim
    entry = _charge_usage(
        organization_id=held_by,
        cost_usd=cost_usd,
        memo=f"{reservation.checkpoint_model} request {reservation.request_id} (interrupted)",
        released_usd=held_usd,
    )
    checkpointed_at = reservation.checkpointed_at or reservation.created_at
    UsageRecord.objects.create(
        request_id=reservation.request_id,
        organization_id=reservation.organization_id,
        api_key_id=reservation.api_key_id,
        model=reservation.checkpoint_model,
        provider=reservation.checkpoint_provider,
        upstream_model=reservation.checkpoint_upstream_model,
        status=UsageRecord.Status.INTERRUPTED,
        http_status=200,  # the stream had started: its client was answered 200
        input_tokens=reservation.checkpoint_input_tokens or 0,
        output_tokens=reservation.checkpoint_output_tokens or 0,
        usage_source=UsageRecord.UsageSource.ESTIMATED,
        cost_usd=cost_usd,
        latency_ms=int((checkpointed_at - reservation.created_at).total_seconds() * 1000),
        ledger_transaction=entry,
        created_at=entry.created_at if entry else timezone.now(),
    )
    return True


@dataclass(frozen=True, slots=True)
class MeteredRequest:
    """What the gateway measured about one request, handed to `usage_settle`."""

    request_id: str
    api_key_id: int
    organization_id: int
    model: str
    provider: str
    upstream_model: str
    status: UsageRecord.Status
    http_status: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    usage_source: UsageRecord.UsageSource
    latency_ms: int
    price: Price
    attempts: int = 1  # routes tried, the one that answered included
    cache_write_input_tokens: int = 0
    time_to_first_token_ms: int | None = None  # None: no answer came (an upstream error)
    # The most the request may be charged, in USD: the worst case its credit was reserved for
    # (None: no bound). Usage reported past it (a provider that ignores max_tokens) is charged
    # this, or concurrent requests could overdraw the wallet and pass the key's spend cap.
    charge_limit_usd: Decimal | None = None


# Account ids never change once made (accounts are never deleted), so each process keeps the
# ones the ORM path needs. Every use re-checks the cached id in its UPDATE's WHERE clause; a
# miss (a database rebuilt under a running process, a test's rolled-back rows) looks it up again.
_account_ids: dict[tuple[int | None, str], int] = {}
# api key id -> time.monotonic() when this process last wrote its last_used_at.
_last_used_written: dict[int, float] = {}
_LAST_USED_CACHE_MAX = 100_000


def _move_account(
    *,
    organization_id: int | None,
    kind: Account.Kind,
    balance_usd: Decimal,
    reserved_usd: Decimal = ZERO_USD,
) -> int:
    """Add to an account's balance and hold in one UPDATE, creating the account on first use
    (an organisation's wallet, or a system account when `organization_id` is None); returns
    its id. Must run inside `transaction.atomic()`."""
    changes = {
        "balance_usd": F("balance_usd") + balance_usd,
        "reserved_usd": F("reserved_usd") + reserved_usd,
    }
    key = (organization_id, kind)
    cached = _account_ids.get(key)
    if (
        cached is not None
        # organization_id=None matches a system account (IS NULL).
        and Account.objects.filter(
            pk=cached,
            organization_id=organization_id,  # type: ignore[misc]
            kind=kind,
        ).update(**changes)
        == 1
    ):
        return cached
    account, _ = Account.objects.get_or_create(organization_id=organization_id, kind=kind)
    Account.objects.filter(pk=account.pk).update(**changes)
    _account_ids[key] = account.pk
    return account.pk


def _settle_with_orm(
    *, metered: MeteredRequest, cost_usd: Decimal, state: Reservation.State
) -> UsageRecord:
    """usage_settle's transaction through the ORM (any database): claim, one charge, usage
    record, last use."""
    with transaction.atomic():
        # Rows are locked in the order credit_reserve locks them (spend window, then
        # wallet), so a settle and a reserve on the same key never deadlock.
        claim = _claim(request_id=metered.request_id, state=state, spent_usd=cost_usd)
        released_usd = ZERO_USD
        if claim is None:
            _count_in_swept_window(request_id=metered.request_id, spent_usd=cost_usd)
        else:
            held_by, held_usd = claim
            if held_by == metered.organization_id:
                released_usd = held_usd
            else:  # never by construction; kept exact all the same
                _move_account(
                    organization_id=held_by,
                    kind=Account.Kind.WALLET,
                    balance_usd=ZERO_USD,
                    reserved_usd=-held_usd,
                )
        entry = _charge_usage(
            organization_id=metered.organization_id,
            cost_usd=cost_usd,
            memo=_usage_memo(metered),
            released_usd=released_usd,
        )
        record = UsageRecord.objects.create(
            request_id=metered.request_id,
            ledger_transaction=entry,
            cost_usd=cost_usd,
            created_at=entry.created_at if entry else timezone.now(),
            **_usage_columns(metered),
        )
        if _last_use_due(api_key_id=metered.api_key_id):
            ApiKey.objects.filter(pk=metered.api_key_id).filter(
                Q(last_used_at__isnull=True)
                | Q(last_used_at__lt=record.created_at - LAST_USED_RESOLUTION)
            ).update(last_used_at=record.created_at)
            _remember_last_use(api_key_id=metered.api_key_id)
    return record


def _settle_in_one_statement(
    *, metered: MeteredRequest, cost_usd: Decimal, state: Reservation.State
) -> UsageRecord | None:
    """usage_settle's transaction as one PostgreSQL statement (billing/hot_path_sql.py); None
    when it cannot run it (an account's first use), having written nothing."""
    settling = _OneStatementSettlement(metered=metered, cost_usd=cost_usd, state=state)
    try:
        # Inside a caller's transaction a failed statement would abort it: a savepoint keeps
        # the failure to this statement. Alone (the gateway), the statement is its own
        # transaction.
        with (
            transaction.atomic() if transaction.get_connection().in_atomic_block else nullcontext()
        ):
            (settled,) = hot_path_sql.settle([settling.values]).run()
    except DataError as error:
        if hot_path_sql.aborted_on_purpose(error):
            return None
        raise
    if settling.touch:
        _remember_last_use(api_key_id=metered.api_key_id)
    return settling.usage_record(settled)


async def usage_settle_on_loop(*, metered: MeteredRequest) -> UsageRecord | None:
    """usage_settle for an event loop (the gateway): the same one statement, on the loop's own
    connections (billing/loop_database.py), with no thread. None when only usage_settle can do
    it (not PostgreSQL, the loop's connections resting after a failure, an account's first use,
    or the request settled already: usage_settle then answers its record), having written
    nothing."""
    connections = loop_connections() if hot_path_sql.available() else None
    if connections is None:
        return None
    cost_usd, state = _charge_of(metered)
    settling = _OneStatementSettlement(metered=metered, cost_usd=cost_usd, state=state)
    try:
        settled = await connections.batches(_send_settlements).run(settling.values)
    except IntegrityError:
        return None
    except DataError as error:
        if hot_path_sql.aborted_on_purpose(error):
            return None
        raise
    if settling.touch:
        _last_use_written(api_key_id=metered.api_key_id, at=time.monotonic())
    return settling.usage_record(settled)


async def _send_settlements(
    connections: LoopConnections, settlements: list[dict[str, Any]]
) -> list[hot_path_sql.Settled]:
    return await hot_path_sql.settle(settlements).run_on_loop(connections)


class _OneStatementSettlement:
    """A settlement by hot_path_sql's statement, and the usage record it wrote."""

    def __init__(
        self, *, metered: MeteredRequest, cost_usd: Decimal, state: Reservation.State
    ) -> None:
        self.now = timezone.now()
        self.touch = _last_use_due(api_key_id=metered.api_key_id)
        self.metered = metered
        self.cost_usd = cost_usd
        self.columns = _usage_columns(metered)
        self.values = hot_path_sql.settlement(
            request_id=metered.request_id,
            organization_id=metered.organization_id,
            api_key_id=metered.api_key_id,
            reservation_state=state,
            cost_usd=cost_usd,
            memo=_usage_memo(metered),
            record=self.columns,
            touch_last_used=self.touch,
            last_used_before=self.now - LAST_USED_RESOLUTION,
            now=self.now,
        )

    def usage_record(self, settled: hot_path_sql.Settled) -> UsageRecord:
        return _as_stored(
            UsageRecord,
            {
                **self.columns,
                "id": settled.usage_record_id,
                "request_id": self.metered.request_id,
                "cost_usd": self.cost_usd,
                "ledger_transaction_id": settled.ledger_transaction_id,
                "created_at": self.now,
            },
        )


_Model = TypeVar("_Model", bound=Model)


def _as_stored(model: type[_Model], columns: dict[str, Any]) -> _Model:
    """The `model` row a one-statement reservation or settlement wrote with `columns` (the
    others at their defaults), made as Django makes an unpickled instance (Model.__reduce__):
    its attributes set at once. Model.__init__ sets them one by one, through each field's
    descriptor, and took 4× as long (every request makes two); it alone sends pre_init and
    post_init, so it is used whenever something listens to them."""
    fields = model._meta.concrete_fields
    if pre_init.has_listeners(model) or post_init.has_listeners(model):
        return model.from_db(
            "default",
            [field.attname for field in fields],
            [
                columns[field.attname] if field.attname in columns else field.get_default()
                for field in fields
            ],
        )
    constant, called = _column_defaults(model)
    stored = model.__new__(model)
    stored.__dict__.update(constant)
    for field in called:
        if field.attname not in columns:
            stored.__dict__[field.attname] = field.get_default()
    stored.__dict__.update(columns)
    state = stored._state = ModelState()
    state.adding = False
    state.db = "default"
    return stored


@functools.cache
def _column_defaults(model: type[Model]) -> tuple[dict[str, Any], tuple[Field[Any, Any], ...]]:
    """`model`'s column defaults: those that are values (by attribute name), and the fields
    whose default is a callable, called for each row as Django does."""
    constant: dict[str, Any] = {}
    called: list[Field[Any, Any]] = []
    for field in model._meta.concrete_fields:
        if field.has_default() and callable(field.default):
            called.append(field)
        else:
            constant[field.attname] = field.get_default()
    return constant, tuple(called)


def _usage_memo(metered: MeteredRequest) -> str:
    return f"{metered.model} request {metered.request_id}"[:300]


def _usage_columns(metered: MeteredRequest) -> dict[str, Any]:
    """The usage record's columns that come from the request as measured."""
    return {
        "organization_id": metered.organization_id,
        "api_key_id": metered.api_key_id,
        "model": metered.model,
        "provider": metered.provider,
        "upstream_model": metered.upstream_model,
        "attempts": metered.attempts,
        "status": metered.status,
        "http_status": metered.http_status,
        "input_tokens": metered.input_tokens,
        "output_tokens": metered.output_tokens,
        "cached_input_tokens": metered.cached_input_tokens,
        "cache_write_input_tokens": metered.cache_write_input_tokens,
        "usage_source": metered.usage_source,
        "latency_ms": metered.latency_ms,
        "time_to_first_token_ms": metered.time_to_first_token_ms,
    }


def _last_use_due(*, api_key_id: int) -> bool:
    """Whether this settlement should move the key's last_used_at: at most once per
    LAST_USED_RESOLUTION from this process (and never more often than that in the database),
    so a busy key is not row-locked by every request's transaction nor costs each one a write."""
    written = _last_used_written.get(api_key_id)
    return written is None or time.monotonic() - written >= LAST_USED_RESOLUTION.total_seconds()


def _remember_last_use(*, api_key_id: int) -> None:
    now = time.monotonic()
    # Only once the write is committed: a rollback undoes it.
    transaction.on_commit(lambda: _last_use_written(api_key_id=api_key_id, at=now))


def _last_use_written(*, api_key_id: int, at: float) -> None:
    if len(_last_used_written) >= _LAST_USED_CACHE_MAX:
        _last_used_written.clear()
    _last_used_written[api_key_id] = at


def usage_settle(*, metered: MeteredRequest) -> UsageRecord:
    """Record a request's usage, charge its exact cost and release its reservation, in one
    transaction.

    Idempotent by request id: settling the same request again returns the first record and
    charges nothing more (the unique constraint decides, not a check in Python). A request
    whose reservation was already swept is still charged: the usage happened.
    """
    cost_usd, state = _charge_of(metered)
    try:
        record = None
        if hot_path_sql.available():
            record = _settle_in_one_statement(metered=metered, cost_usd=cost_usd, state=state)
        return record or _settle_with_orm(metered=metered, cost_usd=cost_usd, state=state)
    except IntegrityError:
        existing = UsageRecord.objects.filter(request_id=metered.request_id).first()
        if existing is None:
            raise
        return existing


def _charge_of(metered: MeteredRequest) -> tuple[Decimal, Reservation.State]:
    """A request's exact cost, at most its charge limit (the hold is what it was allowed to
    cost), and the state its hold ends in (voided when the upstream failed: it costs
    nothing)."""
    cost_usd = usage_cost_usd(
        price=metered.price,
        input_tokens=metered.input_tokens,
        output_tokens=metered.output_tokens,
        cached_input_tokens=metered.cached_input_tokens,
        cache_write_input_tokens=metered.cache_write_input_tokens,
    )
    limit_usd = metered.charge_limit_usd
    if limit_usd is not None and cost_usd > limit_usd:
        logger.warning(
            "request %s: its usage costs %s, past the %s it held; charged %s",
            metered.request_id,
            cost_usd,
            limit_usd,
            limit_usd,
        )
        cost_usd = limit_usd
    state = (
        Reservation.State.VOIDED
        if metered.status == UsageRecord.Status.UPSTREAM_ERROR
        else Reservation.State.SETTLED
    )
    return cost_usd, state


# Which way each kind of card movement moves the wallet: +1 adds to it, -1 takes from it.
CARD_MONEY_KINDS: dict[LedgerTransaction.Kind, int] = {
    LedgerTransaction.Kind.TOPUP: 1,
    LedgerTransaction.Kind.REFUND: -1,
    LedgerTransaction.Kind.DISPUTE_WITHDRAWAL: -1,
    LedgerTransaction.Kind.DISPUTE_REINSTATEMENT: 1,
    LedgerTransaction.Kind.REFUND_FAILED: 1,
}


def card_money_post(
    *, organization_id: int, kind: LedgerTransaction.Kind, amount_usd: Decimal, memo: str
) -> LedgerTransaction:
    """Move `amount_usd` (positive) of card money between the payments clearing account and a
    wallet, in the direction `kind` says: to the wallet for a paid top-up, a failed refund or
    a reinstated dispute, from it for a refund or a disputed payment.

    Taking money back is not limited by the available credit (the customer has the money
    back): the wallet may go negative, and then no request is admitted until it is topped up.
    Must run inside `transaction.atomic()` with the row that makes it happen once.
    """
    direction = CARD_MONEY_KINDS.get(kind)
    if direction is None:
        raise BillingError(f"{kind!r} is not a card movement")
    if amount_usd <= ZERO_USD:
        raise BillingError("a card movement must be a positive amount")
    to_wallet_usd = amount_usd * direction
    wallet = wallet_get_or_create(organization_id=organization_id)
    return _post(
        kind=kind,
        memo=memo,
        legs=[(wallet, to_wallet_usd), (_system_account(Account.Kind.PAYMENTS), -to_wallet_usd)],
    )


def spend_cap_set(
    *, api_key: ApiKey, amount_usd: Decimal | None, window: SpendCap.Window
) -> SpendCap | None:
    """Set (or, with no amount, remove) a key's spend cap. The window's spend so far is kept:
    changing the amount or the window applies to what the key already spent in it."""
    if amount_usd is None:
        SpendCap.objects.filter(api_key=api_key).delete()
        return None
    if amount_usd < ZERO_USD:
        raise BillingError("a spend cap cannot be negative")
    cap, _ = SpendCap.objects.update_or_create(
        api_key=api_key, defaults={"amount_usd": amount_usd, "window": window}
    )
    return cap


def spend_cap_copy(*, from_key: ApiKey, to_key: ApiKey) -> None:
    """Give a rotated key's replacement the same spend cap (its spend starts afresh)."""
    cap = SpendCap.objects.filter(api_key=from_key).first()
    if cap is not None:
        SpendCap.objects.update_or_create(
            api_key=to_key, defaults={"amount_usd": cap.amount_usd, "window": cap.window}
        )
