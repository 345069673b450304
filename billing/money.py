"""Money: the one place that knows the scale, the rounding and how a charge is computed.

All amounts are `Decimal` in US dollars. Never `float`: `Decimal(0.1)` is
0.1000000000000000055511151231257827…, so a float that touched money has already lost it.
No other module rounds or quantizes money.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from django.core.validators import MinValueValidator
from django.db import models

# Ten decimal places of a dollar. A single token of a $0.01-per-1M model costs 1e-8 USD, so
# anything coarser would round real charges to zero; 22 digits leave 12 for whole dollars.
USD_PLACES = 10
USD_MAX_DIGITS = 22
USD_QUANTUM = Decimal(1).scaleb(-USD_PLACES)
ZERO_USD = Decimal(0)
TOKENS_PER_PRICE_UNIT = 1_000_000  # prices are per 1M tokens
# The first amount a money column cannot hold (USD_MAX_DIGITS - USD_PLACES whole digits).
USD_LIMIT = Decimal(10) ** (USD_MAX_DIGITS - USD_PLACES)


class MoneyError(ValueError):
    """An amount that is not a valid amount of money."""


def usd_field(**kwargs: object) -> models.DecimalField:
    """A model field holding US dollars at the project's scale."""
    return models.DecimalField(max_digits=USD_MAX_DIGITS, decimal_places=USD_PLACES, **kwargs)  # type: ignore[arg-type]


# For fields that are never negative (prices, caps, thresholds): model forms, the admin's
# included, refuse a negative amount, as the services and the catalog loader do.
NOT_NEGATIVE = [MinValueValidator(ZERO_USD)]


def parse_usd(value: str | int | Decimal) -> Decimal:
    """Parse an amount typed by a person or read from a file, exactly.

    Refuses floats, NaN, infinities and more places than the scale holds (it never rounds
    input: an operator who types 0.12345678901 must be told, not silently charged less).
    """
    if isinstance(value, float):
        raise MoneyError("money must not be given as a float")
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise MoneyError(f"not a decimal amount: {value!r}") from None
    if not amount.is_finite():
        raise MoneyError(f"not a finite amount: {value!r}")
    if abs(amount) >= USD_LIMIT:
        raise MoneyError(f"amount too large: {value!r}")
    if amount != amount.quantize(USD_QUANTUM, rounding=ROUND_HALF_UP):
        raise MoneyError(f"at most {USD_PLACES} decimal places: {value!r}")
    return amount


@dataclass(frozen=True, slots=True)
class Price:
    """A model's prices, in USD per 1M tokens."""

    input_per_mtok_usd: Decimal
    output_per_mtok_usd: Decimal
    cached_input_per_mtok_usd: Decimal = ZERO_USD
    # Writing a prompt into the provider's cache (Anthropic bills it above the input price);
    # None: billed at the input price.
    cache_write_input_per_mtok_usd: Decimal | None = None

    @property
    def cache_write_per_mtok_usd(self) -> Decimal:
        """What a cache-write token costs: its own price, or else the input price."""
        if self.cache_write_input_per_mtok_usd is None:
            return self.input_per_mtok_usd
        return self.cache_write_input_per_mtok_usd


def usage_cost_usd(
    *,
    price: Price,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    cache_write_input_tokens: int = 0,
) -> Decimal:
    """The exact charge for a request, rounded once, half-up, to the project's scale.

    `input_tokens` counts every prompt token; the `cached_input_tokens` (read from the cache)
    and `cache_write_input_tokens` (written to it) among them are billed at their own prices
    instead of the input price. Raises MoneyError for a cost no money column can hold (a
    worst case of absurd token counts: no wallet covers it).
    """
    if min(input_tokens, output_tokens, cached_input_tokens, cache_write_input_tokens) < 0:
        raise MoneyError("token counts cannot be negative")
    if cached_input_tokens + cache_write_input_tokens > input_tokens:
        raise MoneyError("cached and cache-write tokens cannot exceed input tokens")
    unscaled = (
        (input_tokens - cached_input_tokens - cache_write_input_tokens) * price.input_per_mtok_usd
        + cached_input_tokens * price.cached_input_per_mtok_usd
        + cache_write_input_tokens * price.cache_write_per_mtok_usd
        + output_tokens * price.output_per_mtok_usd
    )
    try:
        cost = (unscaled / TOKENS_PER_PRICE_UNIT).quantize(USD_QUANTUM, rounding=ROUND_HALF_UP)
    except InvalidOperation:  # more digits than the decimal context's precision
        raise MoneyError("the cost is too large to be an amount of money") from None
    if cost >= USD_LIMIT:
        raise MoneyError("the cost is too large to be an amount of money")
    return cost


def format_usd(amount: Decimal) -> str:
    """The amount as plain decimal text at full scale, e.g. '9.9999985000'."""
    return f"{amount.quantize(USD_QUANTUM):f}"


CENTS_PER_USD = 100


def usd_from_cents(cents: int) -> Decimal:
    """A Stripe amount (integer cents of USD) as dollars; exact."""
    return Decimal(cents).scaleb(-2)


def cents_from_usd(amount_usd: Decimal) -> int:
    """Dollars as Stripe's integer cents; refuses fractions of a cent rather than round."""
    cents = amount_usd * CENTS_PER_USD
    if cents != cents.to_integral_value():
        raise MoneyError(f"not a whole number of cents: {amount_usd}")
    return int(cents)
