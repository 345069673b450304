"""Celery tasks of billing. Each parses its input and calls one service."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings

from billing.services import reservations_sweep


@shared_task(name="billing.sweep_stale_reservations")
def sweep_stale_reservations() -> int:
    """Resolve reservations whose gateway process died (beat runs it every minute)."""
    return reservations_sweep(
        older_than=timedelta(seconds=settings.BILLING_RESERVATION_SWEEP_AFTER_SECONDS)
    )
