"""`manage.py reconcile` finds each kind of broken invariant and passes clean books."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command

from billing.models import Account, LedgerTransaction, Posting, Reservation, UsageRecord
from billing.selectors import ledger_violations
from billing.services import credit_reserve, usage_settle
from tests.billing.test_ledger import metered
from tests.factories import make_key, make_org

pytestmark = [pytest.mark.django_db, pytest.mark.ledger_may_break]

HOUR = timedelta(hours=1)


@pytest.fixture
def books():
    """An organisation that was granted credit and made one request."""
    org = make_org(credit_usd="1")
    key, _ = make_key(org)
    credit_reserve(
        request_id="req_1", organization_id=org.pk, api_key_id=key.pk, amount_usd=Decimal("0.5")
    )
    usage_settle(metered=metered(key.pk, org.pk))
    return org, key


def test_clean_books_have_no_violations(books, capsys):
    assert ledger_violations(held_longer_than=HOUR) == []
    call_command("reconcile")
    assert "ledger clean" in capsys.readouterr().out


def test_it_finds_a_transaction_that_does_not_sum_to_zero(books):
    entry = LedgerTransaction.objects.filter(kind="usage").get()
    Posting.objects.create(transaction=entry, account=entry.postings.all()[0].account, amount_usd=1)

    violations = ledger_violations(held_longer_than=HOUR)

    assert any(f"transaction #{entry.pk}" in v for v in violations)
    with pytest.raises(CommandError):
        call_command("reconcile")


def test_it_finds_a_balance_that_drifted_from_its_postings(books):
    org, _ = books
    Account.objects.filter(organization=org).update(balance_usd=Decimal("5"))

    assert any("balance 5" in v for v in ledger_violations(held_longer_than=HOUR))


def test_it_finds_a_reserved_amount_without_holds(books):
    org, _ = books
    Account.objects.filter(organization=org).update(reserved_usd=Decimal("0.1"))

    assert any("reserved 0.1" in v for v in ledger_violations(held_longer_than=HOUR))


def test_it_finds_a_reservation_held_past_the_bound(books):
    org, key = books
    credit_reserve(
        request_id="stuck", organization_id=org.pk, api_key_id=key.pk, amount_usd=Decimal(0)
    )
    Reservation.objects.filter(request_id="stuck").update(created_at="2000-01-01T00:00Z")

    assert any("reservation stuck" in v for v in ledger_violations(held_longer_than=HOUR))


def test_it_finds_a_usage_record_whose_charge_differs(books):
    UsageRecord.objects.filter(request_id="req_1").update(cost_usd=Decimal("0.1"))

    assert any("usage req_1" in v for v in ledger_violations(held_longer_than=HOUR))
