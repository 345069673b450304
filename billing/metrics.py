"""Billing's Prometheus metrics: Stripe webhook outcomes, and the holds outstanding (read when
`/metrics` is scraped, never kept in memory).

Metrics are for watching, not for money: the ledger is the record. Amounts are turned into
Prometheus's only number type (a float) here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterator

from django.db.models import Count, Sum
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from billing.models import Reservation

_WEBHOOKS = Counter(
    "switchboard_stripe_webhooks_total",
    "Stripe webhook events received, by event type and the handler's outcome.",
    ["event_type", "outcome"],
)


def webhook_outcome_count(*, event_type: str, outcome: str) -> None:
    """Count one Stripe webhook event and what its handler made of it (e.g. `processed`,
    `duplicate`, `ignored`, `failed`, `bad_signature`). Keep `event_type` to the allow-listed
    types (or `unknown`): each distinct value is a time series."""
    _WEBHOOKS.labels(event_type, outcome).inc()


class ReservationsCollector:
    """Holds still `held` now: how many, and the USD they keep from their wallets."""

    def collect(self) -> Iterator[Metric]:
        held = Reservation.objects.filter(state=Reservation.State.HELD).aggregate(
            count=Count("id"), amount=Sum("amount_usd")
        )
        count = GaugeMetricFamily(
            "switchboard_reservations_outstanding",
            "Reservations held now (requests in flight, or left by a dead process).",
        )
        count.add_metric([], held["count"])
        yield count
        amount = GaugeMetricFamily(
            "switchboard_reservations_outstanding_usd",
            "USD held on wallets by outstanding reservations.",
        )
        # A metric, not money: Prometheus has floats only; the ledger keeps the exact amount.
        amount.add_metric([], float(held["amount"] or 0))
        yield amount
