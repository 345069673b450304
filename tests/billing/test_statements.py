"""Monthly statements: issued once from the ledger alone, identical when re-run, exact."""

from __future__ import annotations

import smtplib
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.mail.backends import locmem
from django.db import transaction

from billing.models import (
    Account,
    BillingAlertSettings,
    BillingCursor,
    LedgerTransaction,
    Posting,
    Statement,
    UsageRecord,
)
from billing.selectors import ledger_violations
from billing.services import (
    _post,
    _system_account,
    card_money_post,
    credit_clawback,
    credit_grant,
    usage_settle,
)
from billing.statements import (
    statement_compute,
    statement_figures,
    statement_issue,
    statements_email_pending,
    statements_issue_due,
)
from billing.tasks import issue_monthly_statements
from portal.models import Organization
from portal.services import organization_create
from tests.billing.test_ledger import metered
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db

OCTOBER = date(2026, 10, 1)
SEPTEMBER_15 = datetime(2026, 9, 15, 12, tzinfo=UTC)
OCTOBER_10 = datetime(2026, 10, 10, 9, tzinfo=UTC)
OCTOBER_31_LATE = datetime(2026, 10, 31, 23, 59, 59, 999999, tzinfo=UTC)
NOVEMBER_1 = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
ISSUE_AT = datetime(2026, 11, 1, 0, 30, tzinfo=UTC)  # past the grace
GRACE = timedelta(minutes=15)
REQUEST_COST = Decimal("0.0035")  # tests.billing.test_ledger.metered: 1000 in, 2000 out


def backdate(entry: LedgerTransaction, moment: datetime) -> LedgerTransaction:
    """Move a transaction (and its usage record) into the past: tests only, the services
    always stamp the present."""
    LedgerTransaction.objects.filter(pk=entry.pk).update(created_at=moment)
    UsageRecord.objects.filter(ledger_transaction=entry).update(created_at=moment)
    return entry


def make_old_org(name: str) -> Organization:
    organization = make_org(name=name, credit_usd=None)
    Organization.objects.filter(pk=organization.pk).update(created_at=SEPTEMBER_15)
    return organization


def use(organization, key, request_id: str, moment: datetime, **overrides) -> None:
    record = usage_settle(
        metered=metered(key.pk, organization.pk, request_id=request_id, **overrides)
    )
    assert record.ledger_transaction is not None
    backdate(record.ledger_transaction, moment)


def card_money(organization, kind: LedgerTransaction.Kind, amount: str, moment: datetime) -> None:
    """A card movement, posted as the Stripe code posts it (billing.payments)."""
    with transaction.atomic():
        entry = card_money_post(
            organization_id=organization.pk, kind=kind, amount_usd=Decimal(amount), memo="card"
        )
    backdate(entry, moment)


def legacy_card_money(organization, amount: str, moment: datetime) -> None:
    """Card money as it was posted before card movements had kinds of their own: `grant` in,
    `clawback` out, against the payments clearing account (such rows stay in the ledger)."""
    amount_usd = Decimal(amount)
    wallet = Account.objects.get(organization=organization, kind=Account.Kind.WALLET)
    with transaction.atomic():
        entry = _post(
            kind=LedgerTransaction.Kind.GRANT
            if amount_usd > 0
            else LedgerTransaction.Kind.CLAWBACK,
            memo="card",
            legs=[(wallet, amount_usd), (_system_account(Account.Kind.PAYMENTS), -amount_usd)],
        )
    backdate(entry, moment)


@pytest.fixture
def busy_org() -> Organization:
    """An organisation with activity before, during and after October 2026."""
    organization = make_old_org("Busy")
    key, _ = make_key(organization)
    other_key, _ = make_key(organization, name="batch")
    backdate(
        credit_grant(organization=organization, amount_usd=Decimal(10), reason="a"), SEPTEMBER_15
    )
    use(organization, key, "sep-1", SEPTEMBER_15)
    # October: a grant, a clawback, card money both ways, usage of two models by two keys.
    backdate(credit_grant(organization=organization, amount_usd=Decimal(5), reason="b"), OCTOBER_10)
    backdate(
        credit_clawback(organization=organization, amount_usd=Decimal(2), reason="c"), OCTOBER_10
    )
    card_money(organization, LedgerTransaction.Kind.TOPUP, "20", OCTOBER_10)
    card_money(organization, LedgerTransaction.Kind.REFUND, "7.5", OCTOBER_10)
    use(organization, key, "oct-1", OCTOBER_10)
    use(organization, other_key, "oct-2", OCTOBER_10)
    use(organization, key, "oct-3", OCTOBER_31_LATE, model="fake-large", output_tokens=4000)
    # November (after the period).
    backdate(credit_grant(organization=organization, amount_usd=Decimal(3), reason="d"), NOVEMBER_1)
    use(organization, key, "nov-1", NOVEMBER_1)
    return organization


def wallet_postings_before(organization, moment: datetime) -> Decimal:
    return sum(
        (
            p.amount_usd
            for p in Posting.objects.filter(
                account__organization=organization, transaction__created_at__lt=moment
            )
        ),
        Decimal(0),
    )


def snapshot() -> list[tuple[object, ...]]:
    return [
        (s.pk, s.organization_id, s.period_start, s.issued_at, statement_figures(statement=s))
        for s in Statement.objects.order_by("pk")
    ]


def test_the_monthly_run_twice_gives_identical_statements_that_match_the_ledger(busy_org):
    quiet = make_old_org("Quiet")
    backdate(credit_grant(organization=quiet, amount_usd=Decimal(1), reason="x"), SEPTEMBER_15)

    first = statements_issue_due(now=ISSUE_AT, grace=GRACE)
    before = snapshot()
    BillingCursor.objects.all().delete()  # as if the first run died before moving the cursor
    second = statements_issue_due(now=ISSUE_AT, grace=GRACE)

    assert snapshot() == before
    assert [s.pk for s in first] == [s.pk for s in second]
    assert Statement.objects.count() == 2
    statement = Statement.objects.get(organization=busy_org)
    figures = statement_figures(statement=statement)
    assert (statement.period_start, statement.period_end) == (OCTOBER, date(2026, 11, 1))
    assert figures.opening_balance_usd == Decimal(10) - REQUEST_COST
    assert {m.section: (m.transactions, m.amount_usd) for m in figures.movements} == {
        "topup": (1, Decimal(20)),
        "refund": (1, Decimal("-7.5")),
        "grant": (1, Decimal(5)),
        "clawback": (1, Decimal(-2)),
        "usage": (3, -(2 * REQUEST_COST + Decimal("0.0065"))),
    }
    assert [m.section for m in figures.movements] == [
        "topup",
        "refund",
        "grant",
        "clawback",
        "usage",
    ]
    assert [
        (line.model, line.requests, line.input_tokens, line.output_tokens, line.cost_usd)
        for line in figures.usage_lines
    ] == [
        ("fake-large", 1, 1000, 4000, Decimal("0.0065")),
        ("fake-small", 2, 2000, 4000, 2 * REQUEST_COST),
    ]
    # To the last unit: opening + movements == closing == the wallet's postings at period end,
    # which is also today's balance less November's postings.
    moved = sum((m.amount_usd for m in figures.movements), Decimal(0))
    assert figures.opening_balance_usd == wallet_postings_before(
        busy_org, NOVEMBER_1 - timedelta(days=31)
    )
    assert figures.opening_balance_usd + moved == figures.closing_balance_usd
    assert figures.closing_balance_usd == wallet_postings_before(busy_org, NOVEMBER_1)
    balance_now = Account.objects.get(organization=busy_org, kind=Account.Kind.WALLET).balance_usd
    assert figures.closing_balance_usd == balance_now - Decimal(3) + REQUEST_COST
    assert (
        sum((line.cost_usd for line in figures.usage_lines), Decimal(0))
        == -figures.movements[-1].amount_usd
    )
    assert ledger_violations(held_longer_than=timedelta(hours=1)) == []


def test_a_month_is_not_issued_before_its_grace_has_passed(busy_org):
    early = statements_issue_due(now=NOVEMBER_1 + GRACE - timedelta(seconds=1), grace=GRACE)
    on_time = statements_issue_due(now=NOVEMBER_1 + GRACE, grace=GRACE)

    assert [s.period_start for s in early] == [date(2026, 9, 1)]  # the last month then due
    assert [s.period_start for s in on_time] == [OCTOBER]


def test_the_cursor_catches_up_missed_months_and_skips_done_ones(busy_org):
    statements_issue_due(now=datetime(2026, 10, 1, 1, tzinfo=UTC), grace=GRACE)  # September
    issued = statements_issue_due(now=datetime(2026, 12, 2, tzinfo=UTC), grace=GRACE)

    assert [s.period_start for s in issued] == [OCTOBER, date(2026, 11, 1)]
    periods = Statement.objects.filter(organization=busy_org).values_list("period_start", flat=True)
    assert sorted(periods) == [date(2026, 9, 1), OCTOBER, date(2026, 11, 1)]
    november = Statement.objects.get(organization=busy_org, period_start=date(2026, 11, 1))
    october = Statement.objects.get(organization=busy_org, period_start=OCTOBER)
    assert november.opening_balance_usd == october.closing_balance_usd


def test_an_organisation_with_no_wallet_gets_an_empty_statement():
    organization = make_old_org("Empty")

    statement = statement_issue(organization_id=organization.pk, period_start=OCTOBER)

    figures = statement_figures(statement=statement)
    assert (figures.opening_balance_usd, figures.closing_balance_usd) == (0, 0)
    assert figures.movements == figures.usage_lines == ()


@pytest.mark.ledger_may_break
def test_reconcile_reports_a_statement_the_ledger_no_longer_matches(busy_org):
    statement = statement_issue(organization_id=busy_org.pk, period_start=OCTOBER)
    assert ledger_violations(held_longer_than=timedelta(hours=1)) == []

    # A transaction that commits into an issued period (what the grace prevents).
    backdate(credit_grant(organization=busy_org, amount_usd=Decimal(1), reason="late"), OCTOBER_10)

    assert statement_compute(organization_id=busy_org.pk, period_start=OCTOBER) != (
        statement_figures(statement=statement)
    )
    assert ledger_violations(held_longer_than=timedelta(hours=1)) == [
        f"statement #{statement.pk} ({busy_org.pk}, 2026-10): differs from the ledger as it stands"
    ]


def test_an_issued_statement_is_emailed_once_with_its_pdf(busy_org, mailoutbox):
    statements_issue_due(now=ISSUE_AT, grace=GRACE)

    assert statements_email_pending() == 1
    assert statements_email_pending() == 0
    [message] = mailoutbox
    assert message.to == [busy_org.membership_set.get().user.email]
    assert "October 2026" in message.subject
    [(filename, content, mimetype)] = message.attachments
    assert filename == f"statement-{busy_org.slug}-2026-10.pdf"
    assert mimetype == "application/pdf"
    assert content.startswith(b"%PDF")
    assert Statement.objects.get().email_status == Statement.EmailStatus.SENT


def test_statements_go_to_the_billing_email_when_one_is_set(busy_org, mailoutbox):
    BillingAlertSettings.objects.create(organization=busy_org, billing_email="ap@example.com")
    statements_issue_due(now=ISSUE_AT, grace=GRACE)
    statements_email_pending()

    assert [m.to for m in mailoutbox] == [["ap@example.com"]]


def test_a_statement_whose_sender_died_is_sent_again_after_the_retry_delay(busy_org, mailoutbox):
    statement = statement_issue(organization_id=busy_org.pk, period_start=OCTOBER)
    claimed_at = datetime(2026, 11, 1, 1, tzinfo=UTC)
    Statement.objects.filter(pk=statement.pk).update(
        email_status=Statement.EmailStatus.SENDING, email_claimed_at=claimed_at
    )

    assert statements_email_pending(now=claimed_at + timedelta(minutes=5)) == 0
    assert statements_email_pending(now=claimed_at + timedelta(hours=2)) == 1
    assert len(mailoutbox) == 1


class RefusingBackend(locmem.EmailBackend):
    """The test outbox, with a mail server that refuses one address (as SMTP does)."""

    REFUSED = "bounce@example.com"

    def send_messages(self, messages):
        for message in messages:
            if self.REFUSED in message.to:
                raise smtplib.SMTPRecipientsRefused({self.REFUSED: (550, b"no such user")})
        return super().send_messages(messages)


def test_an_address_the_mail_server_refuses_holds_back_no_other_statement(
    busy_org, mailoutbox, settings
):
    bouncing = make_old_org("Bouncing")
    credit_grant(organization=bouncing, amount_usd=Decimal(1), reason="x")
    BillingAlertSettings.objects.create(
        organization=bouncing, billing_email=RefusingBackend.REFUSED
    )
    settings.EMAIL_BACKEND = "tests.billing.test_statements.RefusingBackend"
    statements_issue_due(now=ISSUE_AT, grace=GRACE)

    assert statements_email_pending(now=ISSUE_AT) == 1

    assert [m.to for m in mailoutbox] == [[busy_org.membership_set.get().user.email]]
    refused = Statement.objects.get(organization=bouncing)
    assert refused.email_status == Statement.EmailStatus.SENDING  # retried after the delay
    assert statements_email_pending(now=ISSUE_AT + timedelta(hours=2)) == 0
    claimed_again = Statement.objects.get(organization=bouncing).email_claimed_at
    assert claimed_again is not None and refused.email_claimed_at is not None
    assert claimed_again > refused.email_claimed_at


def test_the_owner_of_an_org_created_after_the_period_gets_no_statement_for_it():
    organization_create(name="New", owner_email="new@example.com")

    assert statements_issue_due(now=ISSUE_AT, grace=GRACE) == []


def test_the_beat_task_run_twice_issues_last_months_statements_once(busy_org, mailoutbox):
    Organization.objects.filter(pk=busy_org.pk).update(created_at=datetime(2000, 1, 1, tzinfo=UTC))
    first = issue_monthly_statements()
    before = snapshot()
    second = issue_monthly_statements()

    assert (first, second) == (1, 0)
    assert snapshot() == before
    [statement] = Statement.objects.all()
    assert statement.email_status == Statement.EmailStatus.SENT
    assert len(mailoutbox) == 1


@pytest.fixture
def card_org() -> Organization:
    """October 2026: a grant, a $100 top-up, two partial refunds, a $30 dispute withdrawn and
    then reinstated."""
    organization = make_old_org("Card")
    backdate(credit_grant(organization=organization, amount_usd=Decimal(1), reason="a"), OCTOBER_10)
    card_money(organization, LedgerTransaction.Kind.TOPUP, "100", OCTOBER_10)
    card_money(organization, LedgerTransaction.Kind.REFUND, "20", OCTOBER_10)
    card_money(organization, LedgerTransaction.Kind.REFUND, "30", OCTOBER_10)
    card_money(organization, LedgerTransaction.Kind.DISPUTE_WITHDRAWAL, "30", OCTOBER_10)
    card_money(organization, LedgerTransaction.Kind.DISPUTE_REINSTATEMENT, "30", OCTOBER_10)
    return organization


def test_each_kind_of_card_movement_has_its_own_line_in_the_order_of_sections(card_org):
    figures = statement_compute(organization_id=card_org.pk, period_start=OCTOBER)

    assert [(m.section, m.transactions, m.amount_usd) for m in figures.movements] == [
        ("topup", 1, Decimal(100)),
        ("refund", 2, Decimal(-50)),
        ("dispute_withdrawal", 1, Decimal(-30)),
        ("dispute_reinstatement", 1, Decimal(30)),
        ("grant", 1, Decimal(1)),
    ]
    assert figures.closing_balance_usd == Decimal(51)


def test_card_money_posted_before_its_own_kinds_keeps_its_earlier_lines():
    organization = make_old_org("Legacy")
    backdate(credit_grant(organization=organization, amount_usd=Decimal(1), reason="a"), OCTOBER_10)
    legacy_card_money(organization, "40", OCTOBER_10)
    legacy_card_money(organization, "-15", OCTOBER_10)
    card_money(organization, LedgerTransaction.Kind.TOPUP, "10", OCTOBER_10)
    statement = statement_issue(organization_id=organization.pk, period_start=OCTOBER)

    figures = statement_figures(statement=statement)

    assert [(m.section, m.transactions, m.amount_usd) for m in figures.movements] == [
        ("topup", 2, Decimal(50)),
        ("refund_dispute", 1, Decimal(-15)),
        ("grant", 1, Decimal(1)),
    ]
    assert ledger_violations(held_longer_than=timedelta(hours=1)) == []
