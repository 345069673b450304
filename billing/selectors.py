"""Reads of balances and usage."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Count, F, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing.models import (
    Account,
    KeySpend,
    LedgerTransaction,
    Reservation,
    SpendCap,
    UsageRecord,
)
from billing.money import ZERO_USD
from billing.statements import statement_violations


def wallet_balance_usd(*, organization_id: int) -> Decimal:
    """The organisation's wallet balance in USD (zero when it has no wallet yet)."""
    balance = (
        Account.objects.filter(organization_id=organization_id, kind=Account.Kind.WALLET)
        .values_list("balance_usd", flat=True)
        .first()
    )
    return ZERO_USD if balance is None else balance


async def wallet_balance_usd_async(*, organization_id: int) -> Decimal:
    balance = await (
        Account.objects.filter(organization_id=organization_id, kind=Account.Kind.WALLET)
        .values_list("balance_usd", flat=True)
        .afirst()
    )
    return ZERO_USD if balance is None else balance


def ledger_violations(*, held_longer_than: timedelta) -> list[str]:
    """Every broken money invariant, one sentence each (empty when the books are clean).

    - each ledger transaction has postings, and they sum to zero;
    - each account's balance equals the sum of its postings;
    - each wallet's reserved amount equals its held reservations, and is not negative;
    - each key's spend window holds exactly its held reservations;
    - no reservation has been held longer than the sweeper's bound;
    - each usage record's cost is exactly what its transaction took from the wallet;
    - each issued statement still matches the ledger (billing.statements).
    """
    violations: list[str] = []
    unbalanced = (
        LedgerTransaction.objects.annotate(
            total=Coalesce(Sum("postings__amount_usd"), ZERO_USD), legs=Count("postings")
        )
        .filter(~Q(total=ZERO_USD) | Q(legs__lt=2))
        .values_list("pk", "total", "legs")
    )
    violations += [
        f"transaction #{pk}: its {legs} postings sum to {total}, not 0"
        for pk, total, legs in unbalanced
    ]
    drifted = (
        Account.objects.annotate(posted=Coalesce(Sum("postings__amount_usd"), ZERO_USD))
        .exclude(balance_usd=F("posted"))
        .values_list("pk", "kind", "balance_usd", "posted")
    )
    violations += [
        f"account #{pk} ({kind}): balance {balance} but its postings sum to {posted}"
        for pk, kind, balance, posted in drifted
    ]
    held_by_org = dict(
        Reservation.objects.filter(state=Reservation.State.HELD)
        .values("organization_id")
        .annotate(total=Sum("amount_usd"))
        .values_list("organization_id", "total")
    )
    for pk, organization_id, reserved in Account.objects.filter(
        kind=Account.Kind.WALLET
    ).values_list("pk", "organization_id", "reserved_usd"):
        held = held_by_org.get(organization_id, ZERO_USD)
        if reserved != held or reserved < ZERO_USD:
            violations.append(
                f"wallet #{pk}: reserved {reserved} but its held reservations total {held}"
            )
    held_by_window = {
        (api_key_id, window_start): total
        for api_key_id, window_start, total in Reservation.objects.filter(
            state=Reservation.State.HELD, spend_window_start__isnull=False
        )
        .values("api_key_id", "spend_window_start")
        .annotate(total=Sum("amount_usd"))
        .values_list("api_key_id", "spend_window_start", "total")
    }
    for api_key_id, window_start, reserved in KeySpend.objects.values_list(
        "api_key_id", "window_start", "reserved_usd"
    ):
        held = held_by_window.get((api_key_id, window_start), ZERO_USD)
        if reserved != held:
            violations.append(
                f"key #{api_key_id} spend window {window_start:%Y-%m-%d}: reserved {reserved} "
                f"but its held reservations total {held}"
            )
    cutoff = timezone.now() - held_longer_than
    violations += [
        f"reservation {request_id}: held since {created_at:%Y-%m-%d %H:%M:%S}, past the "
        "sweeper's bound"
        for request_id, created_at in Reservation.objects.filter(
            state=Reservation.State.HELD, created_at__lt=cutoff
        ).values_list("request_id", "created_at")
    ]
    charged = UsageRecord.objects.annotate(
        taken=Coalesce(
            Sum(
                "ledger_transaction__postings__amount_usd",
                filter=Q(ledger_transaction__postings__account__kind=Account.Kind.WALLET),
            ),
            ZERO_USD,
        )
    ).exclude(taken=-F("cost_usd"))
    violations += [
        f"usage {request_id}: cost {cost} but the wallet was charged {-taken}"
        for request_id, cost, taken in charged.values_list("request_id", "cost_usd", "taken")
    ]
    violations += statement_violations()
    return violations


@dataclass(frozen=True, slots=True)
class ApiKeySpend:
    """What one API key has spent: in total, and in its spend cap's current window."""

    total_usd: Decimal
    window_spent_usd: Decimal | None  # None: the key has no cap
    window_start: datetime | None


def api_key_spend(*, api_key_id: int) -> ApiKeySpend:
    """A key's spend so far, for its page (billing owns the usage, so the page is billing's)."""
    total = UsageRecord.objects.filter(api_key_id=api_key_id).aggregate(
        total=Coalesce(Sum("cost_usd"), ZERO_USD)
    )["total"]
    window = KeySpend.objects.filter(api_key_id=api_key_id).order_by("-window_start").first()
    has_cap = SpendCap.objects.filter(api_key_id=api_key_id).exists()
    return ApiKeySpend(
        total_usd=total,
        window_spent_usd=(window.spent_usd if window else ZERO_USD) if has_cap else None,
        window_start=window.window_start if window and has_cap else None,
    )
