"""Reads of balances and usage."""

from __future__ import annotations

from decimal import Decimal

from billing.models import Account
from billing.money import ZERO_USD


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
