"""Celery tasks of billing. Each parses its input and calls one service."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings

from billing.alerts import (
    low_balance_alerts_check,
    spend_cap_alert_email,
    spend_cap_alerts_check,
)
from billing.rollups import usage_rollup
from billing.services import reservations_sweep
from billing.statements import statements_email_pending, statements_issue_due


@shared_task(name="billing.sweep_stale_reservations")
def sweep_stale_reservations() -> int:
    """Resolve reservations whose gateway process died (beat runs it every minute)."""
    return reservations_sweep(
        older_than=timedelta(seconds=settings.BILLING_RESERVATION_SWEEP_AFTER_SECONDS)
    )


@shared_task(name="billing.process_stripe_event", acks_late=True)
def process_stripe_event(event_id: str) -> str:
    """Apply a stored Stripe event (idempotent: safe to run again after a crash)."""
    from billing.payments import stripe_event_process

    return stripe_event_process(event_id=event_id)


@shared_task(name="billing.start_auto_topups")
def start_auto_topups() -> int:
    """Enqueue a charge for each organisation below its auto top-up threshold (beat, every
    minute). Polling keeps the request path free of it: one indexed query a minute."""
    from billing.payments import auto_topups_due

    due = auto_topups_due()
    for organization_id in due:
        charge_auto_topup.delay(organization_id)
    return len(due)


@shared_task(name="billing.charge_auto_topup", acks_late=True)
def charge_auto_topup(organization_id: int) -> str:
    """One off-session auto top-up; claims the organisation first, so duplicates do nothing."""
    from billing.payments import auto_topup_charge

    return auto_topup_charge(organization_id=organization_id)


@shared_task(name="billing.retry_stripe_events")
def retry_stripe_events() -> int:
    """Apply stored events still unprocessed after a minute (beat, every five minutes)."""
    from billing.payments import stripe_event_process, stripe_events_unprocessed

    event_ids = stripe_events_unprocessed(older_than=timedelta(minutes=1))
    for event_id in event_ids:
        stripe_event_process(event_id=event_id)
    return len(event_ids)


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


@shared_task(name="billing.email_spend_cap_alert", acks_late=True)
def email_spend_cap_alert(alert_id: int) -> bool:
    """Mail a spend-cap alert the gateway recorded when the cap refused a request (once: the
    service claims it; a lost task is covered by the beat check)."""
    return spend_cap_alert_email(alert_id=alert_id)


@shared_task(name="billing.replay_spooled_settlements")
def replay_spooled_settlements() -> int:
    """Settle the requests spooled while the database was down (beat, every 30 s; the
    gateway process that spooled them replays them too). Returns how many were settled."""
    from billing.settlement_spool import spooled_settlements_replay

    return spooled_settlements_replay().settled
