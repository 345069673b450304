from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from django.db import connection
from django.db.transaction import atomic

from billing.models import Account, LedgerTransaction, Posting, UsageRecord
from billing.money import USD_LIMIT, Price
from billing.selectors import wallet_balance_usd
from billing.services import (
    BillingError,
    MeteredRequest,
    _charge_of,
    _settle_with_orm,
    credit_grant,
    credit_grant_once,
    usage_settle,
)
from tests.billing.stripe_helpers import wait_for
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db

PRICE = Price(input_per_mtok_usd=Decimal("0.50"), output_per_mtok_usd=Decimal("1.50"))


def metered(api_key_id: int, organization_id: int, **overrides: object) -> MeteredRequest:
    fields: dict[str, object] = {
        "request_id": "req_1",
        "api_key_id": api_key_id,
        "organization_id": organization_id,
        "model": "fake-small",
        "provider": "fake",
        "upstream_model": "fake-small-upstream",
        "status": UsageRecord.Status.OK,
        "http_status": 200,
        "input_tokens": 1000,
        "output_tokens": 2000,
        "cached_input_tokens": 0,
        "usage_source": UsageRecord.UsageSource.REPORTED,
        "latency_ms": 12,
        "price": PRICE,
    }
    fields.update(overrides)
    return MeteredRequest(**fields)  # type: ignore[arg-type]


def assert_ledger_balanced() -> None:
    for transaction in LedgerTransaction.objects.all():
        assert sum(p.amount_usd for p in transaction.postings.all()) == 0
    for account in Account.objects.all():
        assert account.balance_usd == sum(
            (p.amount_usd for p in Posting.objects.filter(account=account)), Decimal(0)
        )


def test_a_grant_credits_the_wallet_from_the_grants_account():
    organization = make_org(credit_usd=None)

    credit_grant(organization=organization, amount_usd=Decimal("12.5"), reason="welcome")

    assert wallet_balance_usd(organization_id=organization.pk) == Decimal("12.5")
    assert Account.objects.get(kind=Account.Kind.GRANTS).balance_usd == Decimal("-12.5")
    assert_ledger_balanced()


@pytest.mark.parametrize(("amount", "reason"), [("0", "x"), ("-1", "x"), ("1", " ")])
def test_a_grant_must_be_positive_and_explained(amount, reason):
    with pytest.raises(BillingError):
        credit_grant(
            organization=make_org(credit_usd=None), amount_usd=Decimal(amount), reason=reason
        )
    assert not LedgerTransaction.objects.exists()


def test_a_grant_that_would_overflow_a_balance_is_refused_and_writes_nothing():
    # The money columns hold less than USD_LIMIT; the database would refuse the UPDATE with a
    # DataError (a traceback at the CLI, a 500 in the admin).
    organization = make_org(credit_usd=None)
    credit_grant(organization=organization, amount_usd=USD_LIMIT - 1, reason="huge")
    written = LedgerTransaction.objects.count()

    with pytest.raises(BillingError, match="largest amount"):
        credit_grant(organization=organization, amount_usd=Decimal(1), reason="one more")

    assert LedgerTransaction.objects.count() == written
    assert wallet_balance_usd(organization_id=organization.pk) == USD_LIMIT - 1
    assert_ledger_balanced()


def lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE NOT granted")
        return int(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_grants_under_one_reference_that_both_pass_the_check_grant_once():
    organization = make_org(credit_usd="1")
    other = make_org(credit_usd="1")
    written, release = threading.Event(), threading.Event()

    def grant(*, hold: bool) -> tuple[LedgerTransaction, bool]:
        try:
            with atomic():
                made = credit_grant_once(
                    organization=organization, amount_usd=Decimal(5), reason="x", reference="r1"
                )
                if hold:  # uncommitted: the other run's check does not see it
                    written.set()
                    assert release.wait(timeout=30)
            return made
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(grant, hold=True)
        assert written.wait(timeout=30)
        second = pool.submit(grant, hold=False)
        wait_for(lambda: lock_waiters() > 0)  # past the check, waiting on the first's rows
        release.set()
        (entry, granted), (again, granted_again) = first.result(), second.result()

    assert (granted, granted_again, again.pk) == (True, False, entry.pk)
    assert wallet_balance_usd(organization_id=organization.pk) == 6
    assert wallet_balance_usd(organization_id=other.pk) == 1
    assert_ledger_balanced()


def test_settling_charges_the_exact_cost_to_revenue():
    organization = make_org(credit_usd="1")
    api_key, _ = make_key(organization)

    record = usage_settle(metered=metered(api_key.pk, organization.pk))

    assert record.cost_usd == Decimal("0.0035")
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal("0.9965")
    assert Account.objects.get(kind=Account.Kind.REVENUE).balance_usd == Decimal("0.0035")
    assert record.ledger_transaction is not None
    assert_ledger_balanced()


@pytest.mark.parametrize("path", ["one statement", "orm"])
def test_a_charge_and_its_usage_record_carry_one_timestamp(path):
    # The statement puts a charge in the month of its ledger transaction, the usage API and the
    # rollups put the request in the month of its record: a request settled at 23:59:59.999999
    # must not land in October on one and November on the other.
    organization = make_org(credit_usd="1")
    api_key, _ = make_key(organization)
    request = metered(api_key.pk, organization.pk)

    if path == "orm":  # SQLite, an account's first use
        cost_usd, state = _charge_of(request)
        _settle_with_orm(metered=request, cost_usd=cost_usd, state=state)
    else:
        usage_settle(metered=request)

    record = UsageRecord.objects.select_related("ledger_transaction").get()
    assert record.ledger_transaction is not None
    assert record.created_at == record.ledger_transaction.created_at


def test_settling_the_same_request_twice_charges_once():
    organization = make_org(credit_usd="1")
    api_key, _ = make_key(organization)

    first = usage_settle(metered=metered(api_key.pk, organization.pk))
    second = usage_settle(metered=metered(api_key.pk, organization.pk, output_tokens=9999))

    assert second.pk == first.pk
    assert UsageRecord.objects.count() == 1
    assert wallet_balance_usd(organization_id=organization.pk) == Decimal("0.9965")
    assert_ledger_balanced()


def test_a_free_request_is_recorded_without_a_ledger_transaction():
    organization = make_org(credit_usd="1")
    api_key, _ = make_key(organization)

    record = usage_settle(
        metered=metered(
            api_key.pk,
            organization.pk,
            status=UsageRecord.Status.UPSTREAM_ERROR,
            http_status=502,
            input_tokens=0,
            output_tokens=0,
        )
    )

    assert record.cost_usd == 0
    assert record.ledger_transaction is None
    assert LedgerTransaction.objects.filter(kind=LedgerTransaction.Kind.USAGE).count() == 0


def test_settling_marks_the_key_used():
    organization = make_org(credit_usd="1")
    api_key, _ = make_key(organization)
    other_key, _ = make_key(make_org())

    usage_settle(metered=metered(api_key.pk, organization.pk))

    api_key.refresh_from_db()
    other_key.refresh_from_db()
    assert api_key.last_used_at is not None
    assert other_key.last_used_at is None
