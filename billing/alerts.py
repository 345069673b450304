"""Billing alerts by e-mail: low balance, a key's spend cap reached, a payment failed.

An admitted request pays nothing for alerts. The balance and cap checks are one beat task
(`billing.check_billing_alerts`, every BILLING_ALERTS_CHECK_SECONDS) that reads every wallet
and capped key in two queries, so an alert arrives at most one interval late. (A check after
each settle would add a query, and mail, to the request that crosses the line.) The one
exception is a request the spend cap refuses: `spend_cap_refusal_alert` records the window's
alert then (no query once the process has seen it) and Celery mails it after commit.

Each alert is claimed by a conditional UPDATE (or a unique row) and its mail is sent inside
that same database transaction: if sending fails, the claim rolls back and the next run tries
again; two concurrent runs cannot both claim it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.mail import EmailMessage
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.db.models import DecimalField, Exists, F, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing.models import Account, BillingAlertSettings, KeySpend, SpendCap, SpendCapAlert
from billing.money import (
    USD_MAX_DIGITS,
    USD_PLACES,
    ZERO_USD,
    MoneyError,
    format_usd,
    parse_usd,
)
from billing.services import spend_window_bounds
from portal.models import Membership, Organization

logger = logging.getLogger(__name__)


class AlertSettingsError(ValueError):
    """Billing alert settings that cannot be saved; the message says why."""


def billing_alert_settings_get(*, organization_id: int) -> BillingAlertSettings:
    """The organisation's alert settings (unsaved defaults when it has none yet)."""
    found = BillingAlertSettings.objects.filter(organization_id=organization_id).first()
    return found or BillingAlertSettings(organization_id=organization_id)


def billing_alert_settings_update(
    *, organization_id: int, billing_email: str, low_balance_threshold: str
) -> BillingAlertSettings:
    """Set where billing mail goes (empty: the owners) and the low-balance threshold in USD
    (empty: the default). Changing the threshold does not re-send: the next check re-arms or
    alerts from the balance as it is then."""
    email = billing_email.strip()
    if email:
        try:
            validate_email(email)
        except ValidationError:
            raise AlertSettingsError(f"not an e-mail address: {email!r}") from None
    threshold: Decimal | None = None
    if low_balance_threshold.strip():
        try:
            threshold = parse_usd(low_balance_threshold)
        except MoneyError as exc:
            raise AlertSettingsError(str(exc)) from None
        if threshold < ZERO_USD:
            raise AlertSettingsError("the threshold cannot be negative")
    alert_settings, _ = BillingAlertSettings.objects.update_or_create(
        organization_id=organization_id,
        defaults={"billing_email": email, "low_balance_threshold_usd": threshold},
    )
    return alert_settings


def billing_contacts(*, organization_id: int) -> list[str]:
    """Where an organisation's billing mail goes: its billing e-mail if set, else its owners."""
    billing_email = (
        BillingAlertSettings.objects.filter(organization_id=organization_id)
        .values_list("billing_email", flat=True)
        .first()
    )
    if billing_email:
        return [billing_email]
    return sorted(
        Membership.objects.filter(
            organization_id=organization_id, role=Membership.Role.OWNER, user__is_active=True
        ).values_list("user__email", flat=True)
    )


def _mail_billing_contacts(*, organization_id: int, subject: str, body: str) -> int:
    recipients = billing_contacts(organization_id=organization_id)
    if not recipients:
        logger.warning("organisation %s has no billing contact for %r", organization_id, subject)
        return 0
    return EmailMessage(subject=subject, body=body, to=recipients).send()


def low_balance_alerts_check(*, default_threshold_usd: Decimal) -> int:
    """Mail each organisation whose wallet has fallen below its threshold since last seen at
    or above it (once per crossing); returns how many were alerted.

    An organisation is armed when its balance is seen at or above the threshold, so a new,
    never-funded wallet does not alert; a threshold of 0 alerts when the balance goes negative.
    """
    wallets = Account.objects.filter(kind=Account.Kind.WALLET)
    BillingAlertSettings.objects.bulk_create(
        [
            BillingAlertSettings(organization_id=organization_id)
            for organization_id in wallets.exclude(
                organization_id__in=BillingAlertSettings.objects.values("organization_id")
            ).values_list("organization_id", flat=True)
        ],
        ignore_conflicts=True,
    )
    usd: DecimalField[Decimal, Decimal] = DecimalField(
        max_digits=USD_MAX_DIGITS, decimal_places=USD_PLACES
    )
    rows = BillingAlertSettings.objects.annotate(
        balance=Subquery(
            wallets.filter(organization_id=OuterRef("organization_id")).values("balance_usd")[:1]
        ),
        threshold=Coalesce(
            F("low_balance_threshold_usd"), Value(default_threshold_usd, output_field=usd)
        ),
    ).filter(balance__isnull=False)
    below = list(
        rows.filter(low_balance_armed=True, balance__lt=F("threshold")).values_list(
            "organization_id", "balance", "threshold"
        )
    )
    rearm = list(
        rows.filter(low_balance_armed=False, balance__gte=F("threshold")).values_list(
            "pk", flat=True
        )
    )
    BillingAlertSettings.objects.filter(pk__in=rearm, low_balance_armed=False).update(
        low_balance_armed=True
    )
    alerted = 0
    for organization_id, balance, threshold in below:
        with transaction.atomic():
            claimed = BillingAlertSettings.objects.filter(
                organization_id=organization_id, low_balance_armed=True
            ).update(low_balance_armed=False, low_balance_alerted_at=timezone.now())
            if claimed != 1:
                continue
            name = Organization.objects.values_list("name", flat=True).get(pk=organization_id)
            _mail_billing_contacts(
                organization_id=organization_id,
                subject=f"Switchboard: {name}'s balance is below {format_usd(threshold)} USD",
                body=(
                    f"The balance of {name} is {format_usd(balance)} USD, below the alert "
                    f"threshold of {format_usd(threshold)} USD.\n\nAdd credit on the dashboard "
                    "to keep your API keys working. You will be told again the next time the "
                    "balance falls below the threshold after rising above it.\n"
                ),
            )
            alerted += 1
    return alerted


# A recorded cap alert not mailed after this long lost its task: the beat check mails it.
_CAP_ALERT_MAIL_GRACE = timedelta(minutes=1)


def spend_cap_alerts_check(*, now: datetime | None = None, percent: int) -> int:
    """Mail each organisation whose key has spent `percent`% of its cap in the key's current
    window, once per key and window, and any recorded alert whose mail was lost (its task
    never ran); returns how many were sent."""
    now = now or timezone.now()
    reached = (
        KeySpend.objects.filter(api_key__spend_cap__isnull=False)
        .annotate(
            cap_usd=F("api_key__spend_cap__amount_usd"),
            cap_window=F("api_key__spend_cap__window"),
            spent_scaled=F("spent_usd") * 100,
        )
        .filter(spent_scaled__gte=F("cap_usd") * percent)
        .exclude(
            Exists(
                SpendCapAlert.objects.filter(
                    api_key_id=OuterRef("api_key_id"), window_start=OuterRef("window_start")
                )
            )
        )
        .values_list("api_key_id", "window_start", "cap_window")
    )
    sent = 0
    for api_key_id, window_start, cap_window in reached:
        if window_start != spend_window_bounds(SpendCap.Window(cap_window), now)[0]:
            continue  # a past window: too late to be useful
        with transaction.atomic():
            alert, created = SpendCapAlert.objects.get_or_create(
                api_key_id=api_key_id, window_start=window_start
            )
            if created:
                sent += spend_cap_alert_email(alert_id=alert.pk, now=now)
    lost = SpendCapAlert.objects.filter(
        emailed_at__isnull=True, sent_at__lt=now - _CAP_ALERT_MAIL_GRACE
    ).values_list("pk", flat=True)
    return sent + sum(spend_cap_alert_email(alert_id=pk, now=now) for pk in list(lost))


def spend_cap_alert_email(*, alert_id: int, now: datetime | None = None) -> bool:
    """Mail a recorded spend-cap alert to its organisation's billing contacts, once.

    The conditional UPDATE of `emailed_at` claims it and the mail goes out in the same
    transaction: if sending fails, the claim rolls back and the beat check sends it later.
    An alert of a window that has ended is marked without mail (too late to be useful).
    False when it was not sent now.
    """
    now = now or timezone.now()
    with transaction.atomic():
        if not SpendCapAlert.objects.filter(pk=alert_id, emailed_at__isnull=True).update(
            emailed_at=now
        ):
            return False
        alert = SpendCapAlert.objects.select_related("api_key__organization").get(pk=alert_id)
        key = alert.api_key
        cap = SpendCap.objects.filter(api_key_id=key.pk).first()
        if cap is None:
            return False  # the cap was removed since
        window = SpendCap.Window(cap.window)
        current_start, resets_at = spend_window_bounds(window, now)
        if alert.window_start != current_start:
            return False
        spend = KeySpend.objects.filter(api_key_id=key.pk, window_start=alert.window_start).first()
        spent_usd = spend.spent_usd if spend else ZERO_USD
        resets = f"It resets at {resets_at:%Y-%m-%d %H:%M} UTC." if resets_at else ""
        _mail_billing_contacts(
            organization_id=key.organization_id,
            subject=f"Switchboard: API key {key.name!r} reached its spend cap",
            body=(
                f"The API key {key.name!r} ({key.prefix}…) of {key.organization.name} has "
                f"spent {format_usd(spent_usd)} USD of its {format_usd(cap.amount_usd)} USD cap "
                f"({window.label}). Requests that would pass the cap are refused. "
                f"{resets}\n"
            ),
        )
    return True


# (API key id, window start) of the cap alerts this process knows are recorded, so that a key
# refused again and again costs no query at all. Bounded; cleared when full.
_cap_alerts_known: set[tuple[int, datetime]] = set()
_CAP_ALERTS_KNOWN_MAX = 100_000


def spend_cap_refusal_alert(
    *, api_key_id: int, window: SpendCap.Window, now: datetime | None = None
) -> bool:
    """Record that a key's spend cap refused a request, once per key and window, and have its
    organisation mailed by Celery once that commits. True when recorded now.

    For the gateway's refusal path (never the admitted one): no query when this process has
    already seen the window's alert, else one lookup on the unique (key, window) index, and
    an INSERT only the first time. Concurrent refusals race on the unique constraint; one wins.
    """
    window_start, _ = spend_window_bounds(window, now or timezone.now())
    known = (api_key_id, window_start)
    if known in _cap_alerts_known:
        return False
    recorded = False
    if not SpendCapAlert.objects.filter(api_key_id=api_key_id, window_start=window_start).exists():
        try:
            with transaction.atomic():
                alert = SpendCapAlert.objects.create(
                    api_key_id=api_key_id, window_start=window_start
                )
                transaction.on_commit(lambda: _spend_cap_alert_enqueue(alert_id=alert.pk))
            recorded = True
        except IntegrityError:
            pass  # a concurrent refusal recorded it
    if len(_cap_alerts_known) >= _CAP_ALERTS_KNOWN_MAX:
        _cap_alerts_known.clear()
    _cap_alerts_known.add(known)
    return recorded


def _spend_cap_alert_enqueue(*, alert_id: int) -> None:
    from billing.tasks import email_spend_cap_alert  # tasks import this module

    email_spend_cap_alert.delay(alert_id)


def alert_payment_failed(
    *,
    organization_id: int,
    amount_usd: Decimal | None = None,
    reason: str = "",
    auto_topup_disabled: bool = False,
) -> int:
    """Tell an organisation's billing contacts that a card payment failed.

    For billing's Stripe code to call once per failed payment (it owns the deduplication, by
    event or PaymentIntent). Returns how many messages were sent (0: no billing contact).
    """
    name = Organization.objects.values_list("name", flat=True).get(pk=organization_id)
    amount = f" of {format_usd(amount_usd)} USD" if amount_usd is not None else ""
    because = f"\n\nThe card issuer said: {reason}" if reason else ""
    disabled = (
        "\n\nAuto top-up has been switched off after repeated failures; switch it on again "
        "on the dashboard once the card is fixed."
        if auto_topup_disabled
        else ""
    )
    return _mail_billing_contacts(
        organization_id=organization_id,
        subject=f"Switchboard: a payment{amount} for {name} failed",
        body=f"A card payment{amount} for {name} failed; no credit was added.{because}{disabled}\n",
    )
