from __future__ import annotations

from decimal import Decimal

import pytest

from billing.money import MoneyError, Price, format_usd, parse_usd, usage_cost_usd

PRICE = Price(input_per_mtok_usd=Decimal("0.50"), output_per_mtok_usd=Decimal("1.50"))


def test_the_cost_is_tokens_times_price_per_million():
    assert usage_cost_usd(price=PRICE, input_tokens=1000, output_tokens=2000) == Decimal("0.0035")


def test_cached_input_tokens_are_billed_at_the_cached_price():
    price = Price(
        input_per_mtok_usd=Decimal("3"),
        output_per_mtok_usd=Decimal("15"),
        cached_input_per_mtok_usd=Decimal("0.30"),
    )
    cost = usage_cost_usd(price=price, input_tokens=1000, output_tokens=0, cached_input_tokens=400)
    assert cost == Decimal("0.00192")  # 600 × 3 + 400 × 0.30, per 1M


def test_cache_writes_are_billed_at_the_cache_write_price_or_else_the_input_price():
    price = Price(
        input_per_mtok_usd=Decimal("3"),
        output_per_mtok_usd=Decimal("15"),
        cached_input_per_mtok_usd=Decimal("0.30"),
        cache_write_input_per_mtok_usd=Decimal("3.75"),
    )
    cost = usage_cost_usd(
        price=price,
        input_tokens=1000,
        output_tokens=0,
        cached_input_tokens=400,
        cache_write_input_tokens=500,
    )
    assert cost == Decimal("0.002295")  # (100 × 3 + 400 × 0.30 + 500 × 3.75) / 1M
    without = Price(input_per_mtok_usd=Decimal("3"), output_per_mtok_usd=Decimal("15"))
    assert usage_cost_usd(
        price=without, input_tokens=1000, output_tokens=0, cache_write_input_tokens=500
    ) == Decimal("0.003")


def test_the_cost_is_rounded_once_half_up_at_ten_places():
    price = Price(input_per_mtok_usd=Decimal("0.00005"), output_per_mtok_usd=Decimal(0))
    # 1 token × 0.00005 / 1M = 5e-11: exactly half a unit of the scale, rounds up.
    assert usage_cost_usd(price=price, input_tokens=1, output_tokens=0) == Decimal("1E-10")
    price = Price(input_per_mtok_usd=Decimal("0.00004"), output_per_mtok_usd=Decimal(0))
    assert usage_cost_usd(price=price, input_tokens=1, output_tokens=0) == Decimal(0)


def test_a_large_request_keeps_every_digit():
    price = Price(input_per_mtok_usd=Decimal("0.1234567891"), output_per_mtok_usd=Decimal("75"))
    cost = usage_cost_usd(price=price, input_tokens=1_999_999, output_tokens=123_457)
    assert cost == Decimal("9.5061884547")  # 9.50618845474321…, rounded half-up


@pytest.mark.parametrize("bad", [0.1, "abc", "NaN", "Infinity", "0.12345678901", "1e30"])
def test_parse_usd_refuses_what_is_not_exact_money(bad):
    with pytest.raises(MoneyError):
        parse_usd(bad)


@pytest.mark.parametrize(
    ("text", "amount"), [("25", Decimal(25)), (" 12.50 ", Decimal("12.5")), ("-3", Decimal(-3))]
)
def test_parse_usd_reads_decimals_exactly(text, amount):
    assert parse_usd(text) == amount


def test_format_usd_prints_the_full_scale():
    assert format_usd(Decimal("9.99")) == "9.9900000000"


@pytest.mark.parametrize("tokens", [(-1, 0, 0), (0, -1, 0), (10, 0, 11), (10, 0, 6, 5)])
def test_impossible_token_counts_are_refused(tokens):
    with pytest.raises(MoneyError):
        usage_cost_usd(
            price=PRICE,
            input_tokens=tokens[0],
            output_tokens=tokens[1],
            cached_input_tokens=tokens[2],
            cache_write_input_tokens=tokens[3] if len(tokens) > 3 else 0,
        )


@pytest.mark.parametrize("output_tokens", [10**18, 4096 * (2**64 - 1)])
def test_a_cost_too_large_for_a_money_column_is_refused(output_tokens):
    # 10**18 tokens at $75/M is 7.5e13 dollars, past the 12 whole-dollar digits a column
    # holds; 4096 x 2**64 tokens has more digits than the decimal context's precision.
    price = Price(input_per_mtok_usd=Decimal("15"), output_per_mtok_usd=Decimal("75"))

    with pytest.raises(MoneyError):
        usage_cost_usd(price=price, input_tokens=0, output_tokens=output_tokens)
