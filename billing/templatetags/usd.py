"""`{{ amount|usd }}`: an amount of money as plain text at full scale (billing.money)."""

from __future__ import annotations

from decimal import Decimal

from django import template

from billing.money import format_usd

register = template.Library()


@register.filter
def usd(amount: Decimal) -> str:
    # str(Decimal) can print '0E-10'; format_usd always prints plain digits.
    return format_usd(amount)
