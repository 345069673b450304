"""Monthly statements, computed from the ledger alone, issued once, and e-mailed.

A statement covers one UTC calendar month of one organisation's wallet: the opening balance
(its postings before the month), the month's postings grouped by what moved the money
(`SECTIONS`), the usage per model, and the closing balance (its postings before the next
month). Every figure is a sum of postings, so `opening + movements == closing` holds to the
last unit, and `statement_violations` (run by `reconcile`) recomputes each issued statement
from the ledger to prove it still does.

A period is issued only `grace` after it ends: a request settled a moment before midnight
commits a moment after it, and its transaction must be in the ledger before the month is
summed.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.core.mail import EmailMessage
from django.db import IntegrityError, transaction
from django.db.models import Count, OuterRef, Q, Subquery, Sum
from django.utils import timezone
from fpdf import FPDF

from billing.alerts import billing_contacts
from billing.models import (
    Account,
    BillingCursor,
    LedgerTransaction,
    Posting,
    Statement,
    StatementMovement,
    StatementUsageLine,
    UsageRecord,
)
from billing.money import ZERO_USD, format_usd
from portal.models import Organization

CURSOR = "statements"
logger = logging.getLogger(__name__)

_Kind = LedgerTransaction.Kind
_Counterpart = Account.Kind
# What a wallet posting is, by its transaction's kind and the account on the other side, in
# the order a statement lists them: (section, label). Card money moves against the payments
# clearing account, the operator's credit against the grants account. Several keys may share
# a section: their postings are summed into one line.
#
# Ledger rows written before card movements had kinds of their own are `grant` / `clawback`
# against the payments account and are never rewritten: they stay under "Top-ups" (which, for
# those months, includes any reinstated dispute) and "Refunds and disputes", so that a
# statement issued then still matches the ledger. A kind not listed still appears, under its
# own name, so totals always reconcile.
SECTIONS: dict[tuple[str, str], tuple[str, str]] = {
    (_Kind.TOPUP, _Counterpart.PAYMENTS): ("topup", "Top-ups"),
    (_Kind.GRANT, _Counterpart.PAYMENTS): ("topup", "Top-ups"),
    (_Kind.REFUND, _Counterpart.PAYMENTS): ("refund", "Refunds"),
    (_Kind.REFUND_FAILED, _Counterpart.PAYMENTS): ("refund_failed", "Refunds that failed"),
    (_Kind.DISPUTE_WITHDRAWAL, _Counterpart.PAYMENTS): ("dispute_withdrawal", "Disputed payments"),
    (_Kind.DISPUTE_REINSTATEMENT, _Counterpart.PAYMENTS): (
        "dispute_reinstatement",
        "Disputes won (reinstated)",
    ),
    (_Kind.CLAWBACK, _Counterpart.PAYMENTS): ("refund_dispute", "Refunds and disputes (earlier)"),
    (_Kind.GRANT, _Counterpart.GRANTS): ("grant", "Credit granted"),
    (_Kind.CLAWBACK, _Counterpart.GRANTS): ("clawback", "Credit taken back"),
    (_Kind.USAGE, _Counterpart.REVENUE): ("usage", "API usage"),
}
UNRECORDED_USAGE_MODEL = "(usage without a usage record)"


def month_start(day: date) -> date:
    return day.replace(day=1)


def next_month(day: date) -> date:
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Movement:
    section: str
    label: str
    transactions: int
    amount_usd: Decimal  # USD, signed: added to the wallet


@dataclass(frozen=True, slots=True)
class UsageLine:
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    cost_usd: Decimal  # USD charged (positive)


@dataclass(frozen=True, slots=True)
class StatementFigures:
    """What a statement says, as computed from the ledger (also rebuilt from a stored one)."""

    opening_balance_usd: Decimal
    closing_balance_usd: Decimal
    movements: tuple[Movement, ...]
    usage_lines: tuple[UsageLine, ...]


def _wallet_sum_before(*, wallet_id: int, moment: datetime) -> Decimal:
    total = Posting.objects.filter(
        account_id=wallet_id, transaction__created_at__lt=moment
    ).aggregate(total=Sum("amount_usd"))["total"]
    return ZERO_USD if total is None else total


def statement_compute(*, organization_id: int, period_start: date) -> StatementFigures:
    """The statement of an organisation's month, from the ledger (a read; nothing stored)."""
    start, end = _midnight(period_start), _midnight(next_month(period_start))
    wallet_id = (
        Account.objects.filter(organization_id=organization_id, kind=Account.Kind.WALLET)
        .values_list("pk", flat=True)
        .first()
    )
    if wallet_id is None:
        return StatementFigures(ZERO_USD, ZERO_USD, (), ())
    counterpart = (
        Posting.objects.filter(transaction_id=OuterRef("transaction_id"))
        .exclude(account_id=wallet_id)
        .values("account__kind")[:1]
    )
    grouped = (
        Posting.objects.filter(
            account_id=wallet_id,
            transaction__created_at__gte=start,
            transaction__created_at__lt=end,
        )
        .annotate(counterpart=Subquery(counterpart))
        .values("transaction__kind", "counterpart")
        .annotate(total=Sum("amount_usd"), count=Count("transaction_id", distinct=True))
        .order_by()
    )
    order: dict[str, int] = {}
    for section, _ in SECTIONS.values():
        order.setdefault(section, len(order))
    movements: dict[str, Movement] = {}
    for row in grouped:
        kind, other = row["transaction__kind"], row["counterpart"] or "none"
        section, label = SECTIONS.get(
            (kind, other), (f"{kind}:{other}", f"{kind.capitalize()} ({other})")
        )
        before = movements.get(section)
        movements[section] = Movement(
            section=section,
            label=label,
            transactions=row["count"] + (before.transactions if before else 0),
            amount_usd=row["total"] + (before.amount_usd if before else ZERO_USD),
        )
    ordered = tuple(
        sorted(movements.values(), key=lambda m: (order.get(m.section, len(order)), m.section))
    )
    return StatementFigures(
        opening_balance_usd=_wallet_sum_before(wallet_id=wallet_id, moment=start),
        closing_balance_usd=_wallet_sum_before(wallet_id=wallet_id, moment=end),
        movements=ordered,
        usage_lines=_usage_lines(
            organization_id=organization_id,
            start=start,
            end=end,
            charged_usd=-movements["usage"].amount_usd if "usage" in movements else ZERO_USD,
        ),
    )


def _usage_lines(
    *, organization_id: int, start: datetime, end: datetime, charged_usd: Decimal
) -> tuple[UsageLine, ...]:
    """The month's usage per model. A charged request belongs to the month of its ledger
    transaction (so the lines add up to the usage movement); a free one to its record's."""
    grouped = (
        UsageRecord.objects.filter(organization_id=organization_id)
        .filter(
            Q(ledger_transaction__created_at__gte=start, ledger_transaction__created_at__lt=end)
            | Q(ledger_transaction__isnull=True, created_at__gte=start, created_at__lt=end)
        )
        .values("model")
        .annotate(
            requests=Count("pk"),
            input_tokens=Sum("input_tokens"),
            output_tokens=Sum("output_tokens"),
            cached_input_tokens=Sum("cached_input_tokens"),
            cost_usd=Sum("cost_usd", filter=Q(ledger_transaction__isnull=False)),
        )
        .order_by("model")
    )
    lines = [
        UsageLine(
            model=row["model"],
            requests=row["requests"],
            input_tokens=row["input_tokens"],
            output_tokens=row["output_tokens"],
            cached_input_tokens=row["cached_input_tokens"],
            cost_usd=row["cost_usd"] or ZERO_USD,
        )
        for row in grouped
    ]
    # Every usage transaction has its record today; should one not, the statement still adds
    # up, and says so.
    unattributed = charged_usd - sum((line.cost_usd for line in lines), ZERO_USD)
    if unattributed != ZERO_USD:
        lines.append(UsageLine(UNRECORDED_USAGE_MODEL, 0, 0, 0, 0, unattributed))
    return tuple(lines)


def statement_figures(*, statement: Statement) -> StatementFigures:
    """A stored statement's figures, in the shape `statement_compute` returns."""
    return StatementFigures(
        opening_balance_usd=statement.opening_balance_usd,
        closing_balance_usd=statement.closing_balance_usd,
        movements=tuple(
            Movement(m.section, m.label, m.transactions, m.amount_usd)
            for m in statement.movements.order_by("position")
        ),
        usage_lines=tuple(
            UsageLine(
                line.model,
                line.requests,
                line.input_tokens,
                line.output_tokens,
                line.cached_input_tokens,
                line.cost_usd,
            )
            for line in statement.usage_lines.order_by("model")
        ),
    )


def statement_issue(*, organization_id: int, period_start: date) -> Statement:
    """Issue an organisation's statement for the month starting `period_start`, once.

    Idempotent: an issued statement is returned as it is (the unique constraint on
    organisation × period decides between concurrent issuers, not a check in Python).
    """
    if period_start.day != 1:
        raise ValueError("a statement period starts on the first day of a month")
    existing = Statement.objects.filter(
        organization_id=organization_id, period_start=period_start
    ).first()
    if existing is not None:
        return existing
    figures = statement_compute(organization_id=organization_id, period_start=period_start)
    try:
        with transaction.atomic():
            statement = Statement.objects.create(
                organization_id=organization_id,
                period_start=period_start,
                period_end=next_month(period_start),
                opening_balance_usd=figures.opening_balance_usd,
                closing_balance_usd=figures.closing_balance_usd,
            )
            StatementMovement.objects.bulk_create(
                StatementMovement(
                    statement=statement,
                    position=position,
                    section=m.section,
                    label=m.label,
                    transactions=m.transactions,
                    amount_usd=m.amount_usd,
                )
                for position, m in enumerate(figures.movements)
            )
            StatementUsageLine.objects.bulk_create(
                StatementUsageLine(
                    statement=statement,
                    model=line.model,
                    requests=line.requests,
                    input_tokens=line.input_tokens,
                    output_tokens=line.output_tokens,
                    cached_input_tokens=line.cached_input_tokens,
                    cost_usd=line.cost_usd,
                )
                for line in figures.usage_lines
            )
    except IntegrityError:
        return Statement.objects.get(organization_id=organization_id, period_start=period_start)
    return statement


def statements_issue_due(*, now: datetime | None = None, grace: timedelta) -> list[Statement]:
    """Issue every organisation's statement for each month that ended at least `grace` ago
    and is past the cursor (the previous month on first run), then move the cursor.

    Crash-safe: each statement commits on its own and issuing is idempotent, so a run that
    dies half-way is finished by the next; the cursor moves only when a month is complete.
    """
    now = (now or timezone.now()).astimezone(UTC)
    cursor = BillingCursor.objects.filter(name=CURSOR).first()
    # The latest month that ended at least `grace` ago.
    last_month = month_start(month_start((now - grace).date()) - timedelta(days=1))
    period = next_month(cursor.through) if cursor else last_month
    issued: list[Statement] = []
    while period <= last_month:
        organizations = Organization.objects.filter(
            created_at__lt=_midnight(next_month(period))
        ).order_by("pk")
        for organization_id in organizations.values_list("pk", flat=True):
            issued.append(statement_issue(organization_id=organization_id, period_start=period))
        BillingCursor.objects.update_or_create(name=CURSOR, defaults={"through": period})
        period = next_month(period)
    return issued


def statement_email(*, statement_id: int, now: datetime | None = None) -> bool:
    """Send a statement, PDF attached, to its organisation's billing contacts, at least once.

    The conditional UPDATE claims it (`pending`, or `sending` for longer than
    BILLING_STATEMENT_EMAIL_RETRY_SECONDS: its sender died); False when another worker has it
    or it was sent.
    """
    now = now or timezone.now()
    stale = now - timedelta(seconds=settings.BILLING_STATEMENT_EMAIL_RETRY_SECONDS)
    claimed = (
        Statement.objects.filter(pk=statement_id)
        .filter(
            Q(email_status=Statement.EmailStatus.PENDING)
            | Q(email_status=Statement.EmailStatus.SENDING, email_claimed_at__lt=stale)
        )
        .update(email_status=Statement.EmailStatus.SENDING, email_claimed_at=now)
    )
    if claimed != 1:
        return False
    statement = Statement.objects.select_related("organization").get(pk=statement_id)
    recipients = billing_contacts(organization_id=statement.organization_id)
    if recipients:
        message = EmailMessage(
            subject=f"Switchboard statement for {statement.period_start:%B %Y}",
            body=statement_email_body(statement=statement),
            to=recipients,
        )
        message.attach(
            statement_filename(statement=statement, ext="pdf"),
            statement_pdf(statement=statement),
            "application/pdf",
        )
        message.send()
    Statement.objects.filter(pk=statement_id, email_status=Statement.EmailStatus.SENDING).update(
        email_status=Statement.EmailStatus.SENT, emailed_at=timezone.now()
    )
    return True


def statements_email_pending(*, now: datetime | None = None) -> int:
    """E-mail every issued statement not yet sent; returns how many were sent.

    A statement the mail server refuses (one organisation's bad address, a server hiccup) stays
    claimed and is tried again after BILLING_STATEMENT_EMAIL_RETRY_SECONDS; the others are sent
    meanwhile, not held back behind it.
    """
    pending = Statement.objects.exclude(email_status=Statement.EmailStatus.SENT).values_list(
        "pk", flat=True
    )
    sent = 0
    for pk in list(pending):
        try:
            sent += statement_email(statement_id=pk, now=now)
        except OSError as exc:  # smtplib's errors and connection failures
            # The type only: a mail server's message may quote the address.
            logger.error(
                "statement #%s could not be e-mailed (%s); it will be retried",
                pk,
                type(exc).__name__,
            )
    return sent


def statement_filename(*, statement: Statement, ext: str) -> str:
    return f"statement-{statement.organization.slug}-{statement.period_start:%Y-%m}.{ext}"


def statement_email_body(*, statement: Statement) -> str:
    figures = statement_figures(statement=statement)
    lines = [
        f"Your Switchboard statement for {statement.organization.name}, "
        f"{statement.period_start:%B %Y} (UTC), is attached.",
        "",
        f"Opening balance: {format_usd(figures.opening_balance_usd)} USD",
        *(f"{m.label}: {format_usd(m.amount_usd)} USD" for m in figures.movements),
        f"Closing balance: {format_usd(figures.closing_balance_usd)} USD",
    ]
    return "\n".join(lines) + "\n"


def statement_csv(*, statement: Statement) -> str:
    """The statement as CSV: one row per figure, amounts in USD at full scale."""
    figures = statement_figures(statement=statement)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["organization", statement.organization.slug])
    writer.writerow(["period_start", statement.period_start.isoformat()])
    writer.writerow(["period_end", statement.period_end.isoformat()])
    writer.writerow([])
    writer.writerow(["line", "transactions", "amount_usd"])
    writer.writerow(["Opening balance", "", format_usd(figures.opening_balance_usd)])
    for m in figures.movements:
        writer.writerow([m.label, m.transactions, format_usd(m.amount_usd)])
    writer.writerow(["Closing balance", "", format_usd(figures.closing_balance_usd)])
    writer.writerow([])
    writer.writerow(
        ["model", "requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd"]
    )
    for line in figures.usage_lines:
        writer.writerow(
            [
                line.model,
                line.requests,
                line.input_tokens,
                line.output_tokens,
                line.cached_input_tokens,
                format_usd(line.cost_usd),
            ]
        )
    return out.getvalue()


def _latin1(text: str) -> str:
    # The PDF's core font (Helvetica) covers Latin-1 only; other characters print as "?".
    return text.encode("latin-1", "replace").decode("latin-1")


def statement_pdf(*, statement: Statement) -> bytes:
    """The statement as a one-or-more page PDF (fpdf2, core fonts: nothing to ship)."""
    figures = statement_figures(statement=statement)
    pdf = FPDF(format="A4")
    pdf.set_title(_latin1(f"Statement {statement.period_start:%Y-%m}"))
    pdf.set_creator("Switchboard")
    pdf.add_page()
    pdf.set_font("Helvetica", style="B", size=16)
    pdf.cell(
        0, 10, _latin1(f"Statement - {statement.organization.name}"), new_x="LMARGIN", new_y="NEXT"
    )
    pdf.set_font("Helvetica", size=10)
    pdf.cell(
        0,
        6,
        f"{statement.period_start:%Y-%m-%d} to {statement.period_end:%Y-%m-%d} (UTC, end "
        "exclusive). Amounts in USD.",
        new_x="LMARGIN",
        new_y="NEXT",
    )
    pdf.ln(4)
    with pdf.table(col_widths=(100, 30, 60), text_align=("LEFT", "RIGHT", "RIGHT")) as table:
        table.row(["", "Transactions", "Amount (USD)"])
        table.row(["Opening balance", "", format_usd(figures.opening_balance_usd)])
        for m in figures.movements:
            table.row([_latin1(m.label), str(m.transactions), format_usd(m.amount_usd)])
        table.row(["Closing balance", "", format_usd(figures.closing_balance_usd)])
    pdf.ln(6)
    pdf.set_font("Helvetica", style="B", size=12)
    pdf.cell(0, 8, "Usage by model", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", size=9)
    if figures.usage_lines:
        with pdf.table(
            col_widths=(60, 22, 30, 30, 48),
            text_align=("LEFT", "RIGHT", "RIGHT", "RIGHT", "RIGHT"),
        ) as table:
            table.row(["Model", "Requests", "Tokens in", "Tokens out", "Cost (USD)"])
            for line in figures.usage_lines:
                table.row(
                    [
                        _latin1(line.model),
                        str(line.requests),
                        str(line.input_tokens),
                        str(line.output_tokens),
                        format_usd(line.cost_usd),
                    ]
                )
    else:
        pdf.cell(0, 6, "No usage in this period.", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def _amounts(figures: StatementFigures) -> tuple[object, ...]:
    """What must match the ledger: every figure, but not the labels (wording may change)."""
    return (
        figures.opening_balance_usd,
        figures.closing_balance_usd,
        tuple((m.section, m.transactions, m.amount_usd) for m in figures.movements),
        figures.usage_lines,
    )


def statement_violations() -> list[str]:
    """Every issued statement that no longer matches the ledger, one sentence each.

    Recomputes each statement from the postings: its opening and closing balances must equal
    the wallet's postings before its period's start and end, its movements the postings in
    the period, and opening + movements must equal closing.
    """
    violations = []
    for statement in Statement.objects.order_by("pk"):
        stored = statement_figures(statement=statement)
        name = (
            f"statement #{statement.pk} "
            f"({statement.organization_id}, {statement.period_start:%Y-%m})"
        )
        moved = sum((m.amount_usd for m in stored.movements), ZERO_USD)
        if stored.opening_balance_usd + moved != stored.closing_balance_usd:
            violations.append(
                f"{name}: opening {stored.opening_balance_usd} + movements {moved} is not the "
                f"closing {stored.closing_balance_usd}"
            )
        ledger = statement_compute(
            organization_id=statement.organization_id, period_start=statement.period_start
        )
        if _amounts(ledger) != _amounts(stored):
            violations.append(f"{name}: differs from the ledger as it stands")
    return violations


def statements_of_organization(*, organization_id: int) -> list[Statement]:
    """An organisation's statements, newest first."""
    return list(Statement.objects.filter(organization_id=organization_id).order_by("-period_start"))


def statement_get(*, organization_id: int, statement_id: int) -> Statement | None:
    """One of the organisation's statements; None when it has no such statement (whether or
    not another organisation does)."""
    return (
        Statement.objects.select_related("organization")
        .filter(organization_id=organization_id, pk=statement_id)
        .first()
    )
