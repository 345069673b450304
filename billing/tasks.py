"""Celery tasks of billing. Each parses its input and calls one service."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings

from billing.alerts import low_balance_alerts_check, spend_cap_alerts_check
from billing.rollups import usage_rollup
from billing.services import reservations_sweep
from billing.statements import statements_email_pending, statements_issue_due


@shared_task(name="billing.sweep_stale_reservations")
def sweep_stale_reservations() -> int:
    """Resolve reservations whose gateway process died (beat runs it every minute)."""
    return reservations_sweep(
        older_than=timedelta(seconds=settings.BILLING_RESERVATION_SWEEP_AFTER_SECONDS)
    )


@shared_task(name="billing.roll_up_usage")
def roll_up_usage() -> int:
    """Recompute the daily usage rollups from the cursor to today; returns the days done."""
    return len(usage_rollup(final_after=timedelta(seconds=settings.BILLING_PERIOD_GRACE_SECONDS)))


@shared_task(name="billing.issue_monthly_statements")
def issue_monthly_statements() -> int:
    """Issue the statements of every month that has ended (beat runs it hourly; it does
    nothing until a month is over), then e-mail the ones not yet sent."""
    issued = statements_issue_due(grace=timedelta(seconds=settings.BILLING_PERIOD_GRACE_SECONDS))
    statements_email_pending()
    return len(issued)


@shared_task(name="billing.check_billing_alerts")
def check_billing_alerts() -> int:
    """Send the low-balance and spend-cap alerts due (beat: every BILLING_ALERTS_CHECK_SECONDS)."""
    return low_balance_alerts_check(
        default_threshold_usd=settings.BILLING_LOW_BALANCE_THRESHOLD_USD
    ) + spend_cap_alerts_check(percent=settings.BILLING_SPEND_CAP_ALERT_PERCENT)
