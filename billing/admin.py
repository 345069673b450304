"""Operator views of the ledger. Everything is read-only: the ledger changes only through
services (grants from the CLI, usage from the gateway), never by editing rows."""

from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest

from billing.models import (
    Account,
    BillingAlertSettings,
    GrantReference,
    KeySpend,
    LedgerTransaction,
    Posting,
    Reservation,
    SpendCap,
    Statement,
    StatementMovement,
    StatementUsageLine,
    UsageDailyRollup,
    UsageRecord,
)
from billing.money import format_usd
from portal.logs import REQUEST_ID_PATTERN


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class UsdInput(forms.NumberInput):
    """A money amount in a form as plain decimal text ('0.0000000000'), not as str(Decimal)
    writes it, which shows a zero at the money scale as '0E-10'."""

    def format_value(self, value: Any) -> str | None:
        if isinstance(value, Decimal):
            return format_usd(value)
        return super().format_value(value)


class UsdInputs(admin.ModelAdmin):
    """An admin whose editable money fields are written plainly (UsdInput)."""

    formfield_overrides = {models.DecimalField: {"widget": UsdInput}}


class RequestIdSearch(admin.ModelAdmin):
    """A search for a request id, as an operator pastes it from a client's report, is one
    lookup in the unique index on `request_id`. The admin's own search would OR a
    case-insensitive substring match of every search field, which no index serves: a scan of
    the whole table, which grows by a row every request."""

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        term = search_term.strip()
        if REQUEST_ID_PATTERN.fullmatch(term):
            return queryset.filter(request_id=term), False
        return super().get_search_results(request, queryset, search_term)


class PostingInline(admin.TabularInline):
    model = Posting
    extra = 0
    can_delete = False
    readonly_fields = ("account", "amount_usd")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Account)
class AccountAdmin(ReadOnlyAdmin):
    list_display = ("__str__", "kind", "organization", "balance_usd", "created_at")
    list_filter = ("kind",)
    search_fields = ("organization__slug",)


@admin.register(LedgerTransaction)
class LedgerTransactionAdmin(ReadOnlyAdmin):
    list_display = ("id", "kind", "memo", "created_at")
    list_filter = ("kind",)
    search_fields = ("memo",)
    inlines = (PostingInline,)


@admin.register(UsageRecord)
class UsageRecordAdmin(RequestIdSearch, ReadOnlyAdmin):
    list_display = (
        "request_id",
        "organization",
        "model",
        "provider",
        "status",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "usage_source",
        "latency_ms",
        "created_at",
    )
    list_filter = ("status", "usage_source", "provider")
    search_fields = ("request_id", "organization__slug", "model")
    date_hierarchy = "created_at"


@admin.register(Reservation)
class ReservationAdmin(RequestIdSearch, ReadOnlyAdmin):
    list_display = ("request_id", "organization", "api_key", "amount_usd", "state", "created_at")
    list_filter = ("state",)
    search_fields = ("request_id", "organization__slug")


@admin.register(SpendCap)
class SpendCapAdmin(UsdInputs):
    """Operators set a key's spend cap here; the gateway picks it up within seconds."""

    list_display = ("api_key", "amount_usd", "window")
    list_filter = ("window",)
    search_fields = ("api_key__prefix", "api_key__name", "api_key__organization__slug")
    raw_id_fields = ("api_key",)


@admin.register(GrantReference)
class GrantReferenceAdmin(ReadOnlyAdmin):
    list_display = ("reference", "organization", "amount_usd", "ledger_transaction", "created_at")
    search_fields = ("reference", "organization__slug")


@admin.register(KeySpend)
class KeySpendAdmin(ReadOnlyAdmin):
    list_display = ("api_key", "window_start", "spent_usd", "reserved_usd")


# Card payments (Stripe): read-only, written only by billing.payments from Stripe's answers.
from billing.models import (  # noqa: E402 - kept with the admins below for an easy merge
    BillingProfile,
    CardPayment,
    StripeEvent,
    StripeLedgerEntry,
)


@admin.register(CardPayment)
class CardPaymentAdmin(ReadOnlyAdmin):
    list_display = ("stripe_payment_intent_id", "organization", "amount_usd", "origin", "status")
    list_filter = ("status", "origin")
    search_fields = ("stripe_payment_intent_id", "organization__slug")


@admin.register(StripeLedgerEntry)
class StripeLedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ("key", "organization", "amount_usd", "created_at")
    search_fields = ("key", "stripe_object_id", "organization__slug")


@admin.register(StripeEvent)
class StripeEventAdmin(ReadOnlyAdmin):
    list_display = ("event_id", "type", "received_at", "processed_at", "outcome")
    list_filter = ("type",)
    search_fields = ("event_id",)


@admin.register(BillingProfile)
class BillingProfileAdmin(ReadOnlyAdmin):
    list_display = (
        "organization",
        "stripe_customer_id",
        "auto_topup_enabled",
        "auto_topup_threshold_usd",
        "auto_topup_amount_usd",
        "auto_topup_failures",
    )


class StatementMovementInline(admin.TabularInline):
    model = StatementMovement
    extra = 0
    can_delete = False
    readonly_fields = ("position", "section", "label", "transactions", "amount_usd")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class StatementUsageLineInline(admin.TabularInline):
    model = StatementUsageLine
    extra = 0
    can_delete = False
    readonly_fields = (
        "model",
        "requests",
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cost_usd",
    )

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Statement)
class StatementAdmin(ReadOnlyAdmin):
    """Issued by the monthly task from the ledger; never edited (reconcile re-checks them)."""

    list_display = (
        "organization",
        "period_start",
        "opening_balance_usd",
        "closing_balance_usd",
        "email_status",
        "issued_at",
    )
    list_filter = ("period_start", "email_status")
    search_fields = ("organization__slug",)
    inlines = (StatementMovementInline, StatementUsageLineInline)


@admin.register(UsageDailyRollup)
class UsageDailyRollupAdmin(ReadOnlyAdmin):
    list_display = ("day", "organization", "api_key", "model", "requests", "cost_usd")
    list_filter = ("day",)
    search_fields = ("organization__slug", "model")


@admin.register(BillingAlertSettings)
class BillingAlertSettingsAdmin(UsdInputs):
    """Operators set an organisation's billing e-mail and low-balance threshold here."""

    list_display = (
        "organization",
        "billing_email",
        "low_balance_threshold_usd",
        "low_balance_armed",
        "low_balance_alerted_at",
    )
    search_fields = ("organization__slug", "billing_email")
    raw_id_fields = ("organization",)
    readonly_fields = ("low_balance_armed", "low_balance_alerted_at")
