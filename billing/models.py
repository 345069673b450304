"""The ledger (accounts, transactions, postings) and the usage records it charges.

Double-entry and append-only: every `LedgerTransaction` has postings that sum to zero, and an
`Account.balance_usd` moves only inside the database transaction that writes its postings, so
`balance_usd == sum(postings)` always holds (`manage.py reconcile` checks it). Rows are never
edited or deleted (PROTECT everywhere; no update paths in services.py): a correction is a new
transaction.

Sign convention: a posting adds to its account's balance. A wallet's balance is the credit the
organisation can spend; the system accounts mirror it with the opposite sign (a grant moves
money from `grants` to the wallet, usage from the wallet to `revenue`).
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils import timezone

from billing.money import NOT_NEGATIVE, ZERO_USD, usd_field


class Account(models.Model):
    class Kind(models.TextChoices):
        WALLET = "wallet", "Organisation wallet"
        REVENUE = "revenue", "Usage revenue"
        GRANTS = "grants", "Promotional and operator credit"
        PAYMENTS = "payments", "Card payments clearing"

    # Null for the system accounts (revenue, grants, payments), one of each kind.
    organization = models.ForeignKey(
        "portal.Organization", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    balance_usd = usd_field(default=ZERO_USD)  # USD; equals the sum of this account's postings
    # USD held by open reservations (wallets only). Requests are admitted only while
    # balance_usd - reserved_usd covers their worst case, so concurrent requests cannot
    # together spend more than the balance.
    reserved_usd = usd_field(default=ZERO_USD)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "kind"],
                condition=Q(organization__isnull=False),
                name="one_account_of_a_kind_per_org",
            ),
            models.UniqueConstraint(
                fields=["kind"],
                condition=Q(organization__isnull=True),
                name="one_system_account_of_a_kind",
            ),
            models.CheckConstraint(
                condition=Q(kind="wallet", organization__isnull=False)
                | (~Q(kind="wallet") & Q(organization__isnull=True)),
                name="wallets_belong_to_orgs_system_accounts_do_not",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.organization} wallet" if self.organization_id else f"system {self.kind}"


class Reservation(models.Model):
    """A request's worst-case cost, held on its wallet while the request runs.

    Created `held` in the same transaction that raises the wallet's `reserved_usd`; leaves
    `held` exactly once, by a conditional UPDATE, to `settled` (with the request's usage, or
    swept after its process died mid-stream, charged from its checkpoint) or `voided` (failed
    before any token, or swept after its process died with no checkpoint), releasing the hold.
    """

    class State(models.TextChoices):
        HELD = "held"
        SETTLED = "settled"
        VOIDED = "voided"

    request_id = models.CharField(max_length=64)  # unique: Meta.constraints
    # The hold is on this organisation's wallet.
    organization = models.ForeignKey(
        "portal.Organization", on_delete=models.PROTECT, related_name="+"
    )
    api_key = models.ForeignKey("portal.ApiKey", on_delete=models.PROTECT, related_name="+")
    amount_usd = usd_field()  # USD held on the wallet while `held`
    # Set when the key has a spend cap: the KeySpend window that holds the amount too.
    spend_window_start = models.DateTimeField(null=True, blank=True)
    state = models.CharField(max_length=8, choices=State.choices, default=State.HELD)
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    # A stream's usage so far, written at most once a second while it runs
    # (`reservation_checkpoint`), so that the sweeper can charge it if the process dies before
    # settling. Null when never checkpointed; the catalog names are what the usage record needs.
    checkpoint_model = models.CharField(max_length=200, blank=True, default="")
    checkpoint_provider = models.CharField(max_length=100, blank=True, default="")
    checkpoint_upstream_model = models.CharField(max_length=200, blank=True, default="")
    checkpoint_input_tokens = models.PositiveIntegerField(null=True, blank=True)
    checkpoint_output_tokens = models.PositiveIntegerField(null=True, blank=True)
    checkpoint_cost_usd = usd_field(null=True, blank=True)  # USD, the checkpoint's tokens priced
    checkpointed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        # Unique by a constraint, not `unique=True`: on PostgreSQL that also builds a second
        # index on the column for LIKE lookups (as large as the first), which nothing runs but
        # every request wrote to. The same for the usage record.
        constraints = [
            models.UniqueConstraint(fields=["request_id"], name="one_reservation_per_request")
        ]
        indexes = [
            models.Index(fields=["created_at"], condition=Q(state="held"), name="held_reservations")
        ]

    def __str__(self) -> str:
        return f"{self.request_id} ({self.state})"


class SpendCap(models.Model):
    """The most one API key may spend per window, enforced exactly like the wallet: a request is
    admitted only if the window's spend plus its holds plus its worst case fits the cap."""

    class Window(models.TextChoices):
        DAY = "day", "per day (UTC)"
        WEEK = "week", "per week (from Monday, UTC)"
        MONTH = "month", "per calendar month (UTC)"
        TOTAL = "total", "in total (never resets)"

    api_key = models.OneToOneField(
        "portal.ApiKey", on_delete=models.CASCADE, related_name="spend_cap"
    )
    amount_usd = usd_field(validators=NOT_NEGATIVE)  # USD per window
    window = models.CharField(max_length=8, choices=Window.choices, default=Window.MONTH)

    def __str__(self) -> str:
        return f"{self.amount_usd} USD {self.get_window_display()}"


class KeySpend(models.Model):
    """What a capped key has spent, and holds, in one window of its cap."""

    api_key = models.ForeignKey("portal.ApiKey", on_delete=models.PROTECT, related_name="+")
    window_start = models.DateTimeField()
    spent_usd = usd_field(default=ZERO_USD)  # USD charged in this window
    reserved_usd = usd_field(default=ZERO_USD)  # USD held by this key's open reservations

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["api_key", "window_start"], name="one_spend_per_window")
        ]

    def __str__(self) -> str:
        return f"key #{self.api_key_id} from {self.window_start:%Y-%m-%d}: {self.spent_usd} USD"


class LedgerTransaction(models.Model):
    """One movement of money; its postings sum to zero."""

    class Kind(models.TextChoices):
        GRANT = "grant", "Credit granted"
        CLAWBACK = "clawback", "Credit taken back"
        USAGE = "usage", "API usage"
        # Card money, against the payments clearing account (billing.payments). Rows written
        # before these kinds existed are `grant` (top-ups and reinstatements) or `clawback`
        # (refunds and dispute withdrawals) against that account, and stay so: never edited.
        TOPUP = "topup", "Card top-up"
        REFUND = "refund", "Card payment refunded"
        DISPUTE_WITHDRAWAL = "dispute_withdrawal", "Disputed payment withdrawn"
        DISPUTE_REINSTATEMENT = "dispute_reinstatement", "Dispute won: payment reinstated"
        REFUND_FAILED = "refund_failed", "Card refund failed: returned"

    kind = models.CharField(max_length=24, choices=Kind.choices)
    memo = models.CharField(max_length=300)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    def __str__(self) -> str:
        return f"#{self.pk} {self.kind}: {self.memo}"


class Posting(models.Model):
    transaction = models.ForeignKey(
        LedgerTransaction, on_delete=models.PROTECT, related_name="postings"
    )
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="postings")
    amount_usd = usd_field()  # USD, signed: added to the account's balance

    def __str__(self) -> str:
        return f"{self.amount_usd} to {self.account}"


class UsageRecord(models.Model):
    """One API request as metered: one row per request id, written when it is settled.

    Catalog names are copied in as text so that history survives catalog edits.
    """

    class Status(models.TextChoices):
        OK = "ok"
        # A stream that did not finish (the upstream broke off, the client went away, or the
        # gateway process died): charged for what was generated up to that point.
        INTERRUPTED = "interrupted"
        UPSTREAM_ERROR = "upstream_error"

    class UsageSource(models.TextChoices):
        REPORTED = "reported", "Reported by the provider"
        ESTIMATED = "estimated", "Estimated by the gateway"

    request_id = models.CharField(max_length=64)  # unique: Meta.constraints
    # No index of its own: the (organization, created_at) index serves lookups by organisation.
    organization = models.ForeignKey(
        "portal.Organization", on_delete=models.PROTECT, related_name="+", db_index=False
    )
    api_key = models.ForeignKey("portal.ApiKey", on_delete=models.PROTECT, related_name="+")
    model = models.CharField(max_length=200)  # the name the client asked for
    provider = models.CharField(max_length=100)  # the route's provider actually used
    upstream_model = models.CharField(max_length=200)
    attempts = models.PositiveSmallIntegerField(default=1)  # routes tried, this one included
    status = models.CharField(max_length=20, choices=Status.choices)
    http_status = models.PositiveSmallIntegerField()
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    cached_input_tokens = models.PositiveIntegerField(default=0)
    cache_write_input_tokens = models.PositiveIntegerField(default=0)
    usage_source = models.CharField(max_length=10, choices=UsageSource.choices)
    cost_usd = usd_field(default=ZERO_USD)  # USD charged to the wallet for this request
    latency_ms = models.PositiveIntegerField()  # from receiving the request to the last byte
    # Milliseconds from receiving the request to the first token relayed (a stream's first
    # chunk; a whole answer's arrival); empty when no answer came.
    time_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    ledger_transaction = models.OneToOneField(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="usage"
    )
    # A charged record's is its ledger transaction's, to the microsecond (the settlements set
    # it): the statement puts the charge in that transaction's month, the usage API and the
    # rollups put the request in this one's, and they must agree.
    created_at = models.DateTimeField(default=timezone.now, editable=False, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["request_id"], name="one_usage_record_per_request")
        ]
        indexes = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return self.request_id


class BillingProfile(models.Model):
    """An organisation's Stripe customer and auto top-up settings (one row per organisation).

    Created on first need; `stripe_customer_id` is filled once, by `stripe_customer_ensure`.
    """

    organization = models.OneToOneField(
        "portal.Organization", on_delete=models.PROTECT, related_name="billing_profile"
    )
    stripe_customer_id = models.CharField(max_length=255, unique=True, null=True, blank=True)
    # Auto top-up: when the wallet falls below the threshold, charge `amount` to the saved card.
    auto_topup_enabled = models.BooleanField(default=False)
    auto_topup_threshold_usd = usd_field(default=ZERO_USD)  # USD
    auto_topup_amount_usd = usd_field(default=ZERO_USD)  # USD charged each time
    auto_topup_payment_method_id = models.CharField(max_length=255, blank=True, default="")
    auto_topup_card_label = models.CharField(max_length=100, blank=True, default="")
    auto_topup_failures = models.PositiveIntegerField(default=0)  # consecutive failures
    # Set by the conditional UPDATE that claims a top-up; cleared when its outcome is known.
    # At most one auto top-up is in flight per organisation.
    auto_topup_in_flight_since = models.DateTimeField(null=True, blank=True)
    # Numbers each claim: its idempotency key, and its intent's metadata, so that only the
    # latest attempt's events release the claim (billing.payments._auto_topup_latest).
    auto_topup_attempts = models.PositiveIntegerField(default=0)
    # What the latest attempt asked Stripe for, kept while its number is given back (Stripe's
    # answer was lost) and cleared when the retry asks again. The retry sends the same
    # idempotency key, so it must send the same parameters whatever the owner changed since:
    # Stripe refuses a key reused with others, and the attempt after that, under a new key,
    # would charge the card again if the lost call had made its intent.
    auto_topup_retry_amount_usd = usd_field(null=True, blank=True)  # USD; None: no retry due
    auto_topup_retry_payment_method_id = models.CharField(max_length=255, blank=True, default="")

    def __str__(self) -> str:
        return f"billing profile of {self.organization}"


class CardPayment(models.Model):
    """A Stripe PaymentIntent this portal created, for an organisation's wallet.

    `status` follows the webhooks; the credit itself is a `StripeLedgerEntry`.
    """

    class Status(models.TextChoices):
        PENDING = "pending"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    class Origin(models.TextChoices):
        DASHBOARD = "dashboard", "Added on the dashboard"
        AUTO_TOPUP = "auto_topup", "Auto top-up"

    stripe_payment_intent_id = models.CharField(max_length=255, unique=True)
    organization = models.ForeignKey(
        "portal.Organization", on_delete=models.PROTECT, related_name="+"
    )
    amount_usd = usd_field()  # USD asked for
    origin = models.CharField(max_length=12, choices=Origin.choices)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    failure_message = models.CharField(max_length=300, blank=True, default="")
    created_by = models.ForeignKey(
        "portal.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.stripe_payment_intent_id} ({self.status})"


class StripeLedgerEntry(models.Model):
    """A ledger transaction caused by Stripe, at most once per `key`.

    The key names the money movement, not the event that reported it: `<pi>:credit`,
    `<charge>:refund:<re>`, `<charge>:refund:<re>:failed` (the refund failed: given back),
    `<dispute>:withdrawn`, `<dispute>:reinstated`; earlier versions also wrote
    `<charge>:refunded-to:<cents>`. However often and in whatever order events arrive, the
    unique constraint lets each movement happen once.
    """

    key = models.CharField(max_length=300, unique=True)
    organization = models.ForeignKey(
        "portal.Organization", on_delete=models.PROTECT, related_name="+"
    )
    stripe_object_id = models.CharField(max_length=255, db_index=True)  # pi_, ch_ or dp_
    amount_usd = usd_field()  # USD, signed: added to the wallet
    ledger_transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, related_name="stripe_entry"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "Stripe ledger entries"

    def __str__(self) -> str:
        return f"{self.key}: {self.amount_usd} USD"


GRANT_REFERENCE_MAX_LENGTH = 200


class GrantReference(models.Model):
    """An operator's grant made under a reference (`grant_credits --reference`): at most one
    per organisation and reference, so running the grant again grants nothing.

    Kept beside the ledger, not in it: the ledger tables are written by every API request and
    carry no column or index for this. Written in the grant's own database transaction.
    """

    organization = models.ForeignKey(
        "portal.Organization", on_delete=models.PROTECT, related_name="+"
    )
    reference = models.CharField(max_length=GRANT_REFERENCE_MAX_LENGTH)
    amount_usd = usd_field()  # USD granted
    ledger_transaction = models.OneToOneField(
        LedgerTransaction, on_delete=models.PROTECT, related_name="grant_reference"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "reference"], name="one_grant_per_org_and_reference"
            )
        ]

    def __str__(self) -> str:
        return f"{self.reference}: {self.amount_usd} USD"


class StripeEvent(models.Model):
    """A verified Stripe webhook event, stored once by its id, and what handling it did."""

    event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=300, blank=True, default="")

    def __str__(self) -> str:
        return f"{self.event_id} {self.type}"


class UsageDailyRollup(models.Model):
    """One organisation × key × model × UTC day of usage, summed from its usage records.

    Derived data, recomputed by `usage_rollup_days` (an upsert of the whole day: re-running it
    changes nothing), never the source of a charge: the ledger is.
    """

    organization = models.ForeignKey(
        "portal.Organization", on_delete=models.PROTECT, related_name="+"
    )
    api_key = models.ForeignKey("portal.ApiKey", on_delete=models.PROTECT, related_name="+")
    model = models.CharField(max_length=200)  # the name the client asked for
    day = models.DateField()  # UTC day of the usage records' created_at
    requests = models.PositiveIntegerField(default=0)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    cached_input_tokens = models.PositiveBigIntegerField(default=0)
    cache_write_input_tokens = models.PositiveBigIntegerField(default=0)
    cost_usd = usd_field(default=ZERO_USD)  # USD charged for the day's requests

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "api_key", "model", "day"], name="one_rollup_per_day"
            )
        ]
        indexes = [models.Index(fields=["organization", "day"])]

    def __str__(self) -> str:
        return f"{self.organization_id}/{self.api_key_id}/{self.model} {self.day}"


class BillingCursor(models.Model):
    """How far a periodic billing job has got, so that it resumes there after a crash.

    `usage_rollup`: the last UTC day whose rollups are final. `statements`: the first day of
    the last month for which every organisation's statement was issued.
    """

    name = models.CharField(max_length=40, unique=True)
    through = models.DateField()
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} through {self.through}"


class Statement(models.Model):
    """An organisation's monthly statement (UTC calendar month), computed from the ledger alone.

    Issued once per organisation and period (unique), in one database transaction with its
    lines, and never edited afterwards except for its e-mail status. Its totals are exact:
    `opening_balance_usd + sum(movements) == closing_balance_usd`, and both balances equal the
    sum of the wallet's postings before the period's start and end (`reconcile` checks it).

    E-mail status, crash-safe like zulip's invoicing_status: `pending` (issued, not yet sent)
    → `sending` (claimed by one worker with a conditional UPDATE) → `sent`. A worker that dies
    while `sending` leaves the claim to expire, and the statement is sent again later: at
    least once, never lost.
    """

    class EmailStatus(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        SENT = "sent"

    organization = models.ForeignKey(
        "portal.Organization", on_delete=models.PROTECT, related_name="+"
    )
    period_start = models.DateField()  # first day of the month, UTC
    period_end = models.DateField()  # first day of the next month (exclusive)
    opening_balance_usd = usd_field()  # USD, the wallet at period_start 00:00 UTC
    closing_balance_usd = usd_field()  # USD, the wallet at period_end 00:00 UTC
    issued_at = models.DateTimeField(auto_now_add=True)
    email_status = models.CharField(
        max_length=8, choices=EmailStatus.choices, default=EmailStatus.PENDING
    )
    email_claimed_at = models.DateTimeField(null=True, blank=True)
    emailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "period_start"], name="one_statement_per_org_and_month"
            )
        ]
        ordering = ["-period_start"]

    def __str__(self) -> str:
        return f"{self.organization} {self.period_start:%Y-%m}"


class StatementMovement(models.Model):
    """One kind of money movement on a statement: its wallet postings in the period, summed."""

    statement = models.ForeignKey(Statement, on_delete=models.PROTECT, related_name="movements")
    position = models.PositiveSmallIntegerField()  # order on the statement
    section = models.CharField(max_length=40)  # e.g. "topup", "usage" (billing.statements)
    label = models.CharField(max_length=100)
    transactions = models.PositiveIntegerField()  # how many ledger transactions
    amount_usd = usd_field()  # USD, signed: added to the wallet

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["statement", "section"], name="one_movement_per_section"
            )
        ]
        ordering = ["position"]

    def __str__(self) -> str:
        return f"{self.label}: {self.amount_usd}"


class StatementUsageLine(models.Model):
    """One model's usage on a statement."""

    statement = models.ForeignKey(Statement, on_delete=models.PROTECT, related_name="usage_lines")
    model = models.CharField(max_length=200)
    requests = models.PositiveIntegerField()
    input_tokens = models.PositiveBigIntegerField()
    output_tokens = models.PositiveBigIntegerField()
    cached_input_tokens = models.PositiveBigIntegerField()
    cost_usd = usd_field()  # USD charged (positive)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["statement", "model"], name="one_usage_line_per_model")
        ]
        ordering = ["model"]

    def __str__(self) -> str:
        return f"{self.model}: {self.cost_usd}"


class BillingAlertSettings(models.Model):
    """Where an organisation's billing mail goes and when its low-balance alert fires.

    `low_balance_armed` makes the alert fire once per crossing: it is set when the balance is
    seen at or above the threshold and cleared (by the conditional UPDATE that sends the alert)
    when it is seen below.
    """

    organization = models.OneToOneField(
        "portal.Organization", on_delete=models.CASCADE, related_name="billing_alert_settings"
    )
    # Empty: the organisation's owners get billing mail.
    billing_email = models.EmailField(blank=True, default="")
    # USD; null: settings.BILLING_LOW_BALANCE_THRESHOLD_USD.
    low_balance_threshold_usd = usd_field(null=True, blank=True, validators=NOT_NEGATIVE)
    low_balance_armed = models.BooleanField(default=False)
    low_balance_alerted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "billing alert settings"

    def __str__(self) -> str:
        return f"billing alerts of {self.organization_id}"


class SpendCapAlert(models.Model):
    """A key's spend cap was reached (or refused a request) in a window: its organisation is
    told once a window. The row is the claim (unique per key and window); `emailed_at` is set
    by the conditional UPDATE that mails it, so a mail whose task was lost is sent by the next
    beat check, and never twice."""

    api_key = models.ForeignKey("portal.ApiKey", on_delete=models.PROTECT, related_name="+")
    window_start = models.DateTimeField()
    sent_at = models.DateTimeField(
        auto_now_add=True
    )  # when recorded (the name predates emailed_at)
    emailed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["api_key", "window_start"], name="one_cap_alert_per_window"
            )
        ]

    def __str__(self) -> str:
        return f"key #{self.api_key_id} cap reached from {self.window_start:%Y-%m-%d}"
