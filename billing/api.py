"""The management API's billing endpoints: balance, usage over time, the request log,
statements (with their CSV and PDF), a key's spend cap, and `GET /api/v1/key` (what the
calling API key may still spend).

Organisation-scoped views are portal's `OrganizationScoped`: the caller's membership is
resolved before the view runs (404 for an organisation the caller does not belong to) and its
role checked by portal/permissions.py. Members see the usage of their own keys; owners and
admins every key's.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import NON_FIELD_ERRORS
from django.db.models import QuerySet
from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import (
    AuthenticationFailed,
    NotAuthenticated,
    NotFound,
    PermissionDenied,
    ValidationError,
)
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from billing.models import Account, SpendCap, Statement, UsageRecord
from billing.money import ZERO_USD, MoneyError, format_usd, parse_usd
from billing.selectors import api_key_spend
from billing.services import BillingError, spend_cap_set
from billing.statements import (
    statement_csv,
    statement_figures,
    statement_filename,
    statement_get,
    statement_pdf,
    statements_of_organization,
)
from billing.usage import key_spend_summary, usage_records, usage_series
from billing.usage_filters import (
    UsageQueryForm,
    chart_range,
    group_by_of,
    period_of,
    usage_filter,
    usage_query,
)
from portal import api_keys
from portal.api import ApiKeySerializer, api_key_or_404
from portal.api_base import OrganizationScoped, require_api
from portal.models import ApiKey, Membership
from portal.permissions import Action, can
from portal.selectors import api_keys_manageable

_FILTER_PARAMETERS = [
    OpenApiParameter("key", OpenApiTypes.INT, description="Only this API key's requests."),
    OpenApiParameter("model", OpenApiTypes.STR, description="Only this model's requests."),
    OpenApiParameter("status", OpenApiTypes.STR, enum=UsageRecord.Status.values),
    OpenApiParameter("since", OpenApiTypes.DATE, description="From this day (UTC), inclusive."),
    OpenApiParameter("until", OpenApiTypes.DATE, description="To this day (UTC), inclusive."),
]


def visible_keys(membership: Membership) -> QuerySet[ApiKey] | None:
    """The keys whose usage the member may see; None: every key of the organisation."""
    if can(membership, Action.USAGE_VIEW_ALL):
        return None
    return api_keys_manageable(membership=membership)


def _valid_query(request: Request) -> UsageQueryForm:
    form = usage_query(request.query_params)
    if not form.is_valid():
        # In DRF's shape, as the serializers' errors: each field's messages as strings, and the
        # form's own under DRF's non-field key (not Django's "__all__").
        non_field_key: str = api_settings.NON_FIELD_ERRORS_KEY
        raise ValidationError(
            {
                non_field_key if field == NON_FIELD_ERRORS else field: [str(m) for m in errors]
                for field, errors in form.errors.items()
            }
        )
    return form


class BalanceSerializer(serializers.Serializer[Any]):
    balance_usd = serializers.CharField(help_text="USD, exact decimal.")
    reserved_usd = serializers.CharField(help_text="USD held by requests in flight.")
    available_usd = serializers.CharField(help_text="USD requests may still spend.")


class Balance(OrganizationScoped):
    required_actions = {"GET": Action.BILLING_VIEW}

    @extend_schema(responses=BalanceSerializer)
    def get(self, request: Request, organization: str) -> Response:
        wallet = Account.objects.filter(
            organization_id=self.membership.organization_id, kind=Account.Kind.WALLET
        ).first()
        balance = wallet.balance_usd if wallet else ZERO_USD
        reserved = wallet.reserved_usd if wallet else ZERO_USD
        return Response(
            {
                "balance_usd": format_usd(balance),
                "reserved_usd": format_usd(reserved),
                "available_usd": format_usd(balance - reserved),
            }
        )


class UsageBucketSerializer(serializers.Serializer[Any]):
    period_start = serializers.DateField()
    group = serializers.CharField(help_text="The model, or the key's name and prefix.")
    api_key_id = serializers.IntegerField(allow_null=True)
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cost_usd = serializers.DecimalField(max_digits=22, decimal_places=10)


class UsageSerializer(serializers.Serializer[Any]):
    period = serializers.ChoiceField(choices=["day", "week", "month"])
    group_by = serializers.ChoiceField(choices=["model", "key"])
    since = serializers.DateTimeField()
    until = serializers.DateTimeField(help_text="Exclusive.")
    buckets = UsageBucketSerializer(many=True)


class Usage(OrganizationScoped):
    required_actions = {"GET": Action.ORG_VIEW}

    @extend_schema(
        parameters=[
            *_FILTER_PARAMETERS,
            OpenApiParameter("period", OpenApiTypes.STR, enum=["day", "week", "month"]),
            OpenApiParameter("group_by", OpenApiTypes.STR, enum=["model", "key"]),
        ],
        responses=UsageSerializer,
    )
    def get(self, request: Request, organization: str) -> Response:
        """Requests, tokens and spend per day, week or month (UTC), by model or by key.

        Without `since`, the last 30 days, 12 weeks or 12 months.
        """
        membership = self.membership
        form = _valid_query(request)
        period, group_by = period_of(form), group_by_of(form)
        since, until = chart_range(form, period)
        records = usage_records(
            organization_id=membership.organization_id,
            visible_keys=visible_keys(membership),
            filter=replace(usage_filter(form), since=since, until=until),
        )
        buckets = usage_series(records=records, period=period, group_by=group_by)
        return Response(
            UsageSerializer(
                {
                    "period": period,
                    "group_by": group_by,
                    "since": since,
                    "until": until,
                    "buckets": buckets,
                }
            ).data
        )


class RequestLogSerializer(serializers.ModelSerializer[UsageRecord]):
    class Meta:
        model = UsageRecord
        fields = [
            "request_id",
            "created_at",
            "api_key_id",
            "model",
            "provider",
            "status",
            "http_status",
            "input_tokens",
            "output_tokens",
            "cached_input_tokens",
            "cache_write_input_tokens",
            "usage_source",
            "cost_usd",
            "latency_ms",
            "attempts",
        ]
        read_only_fields = fields


class RequestLogPagination(CursorPagination):
    ordering = ("-created_at", "-pk")
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


class RequestLog(OrganizationScoped, ListAPIView[UsageRecord]):
    """The organisation's requests, newest first, with cursor pagination (`next`, `previous`)."""

    required_actions = {"GET": Action.ORG_VIEW}

    serializer_class = RequestLogSerializer
    pagination_class = RequestLogPagination

    def get_queryset(self) -> QuerySet[UsageRecord]:
        membership = self.membership
        return usage_records(
            organization_id=membership.organization_id,
            visible_keys=visible_keys(membership),
            filter=usage_filter(_valid_query(self.request)),
        )

    @extend_schema(parameters=_FILTER_PARAMETERS)
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class ApiKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer sb_…`: an API key (for `GET /api/v1/key` only)."""

    def authenticate(self, request: Request) -> tuple[Any, ApiKey] | None:
        scheme, _, secret = get_authorization_header(request).decode("latin-1").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return None
        if not api_keys.is_well_formed(secret):
            raise AuthenticationFailed("Invalid API key.")
        key = (
            ApiKey.objects.select_related("organization")
            .filter(hashed_key=api_keys.hash_key(secret))
            .first()
        )
        if key is None or key.is_revoked:
            raise AuthenticationFailed("Invalid API key, or the key has been revoked.")
        if key.expires_at is not None and key.expires_at <= timezone.now():
            raise AuthenticationFailed("This API key has expired.")
        networks = api_keys.allowlist_networks(key.ip_allowlist)
        if not api_keys.address_allowed(networks, request.META.get("REMOTE_ADDR")):
            raise PermissionDenied("This API key may not be used from your IP address.")
        return AnonymousUser(), key

    def authenticate_header(self, request: Request) -> str:
        return "Bearer"


class SpendCapSerializer(serializers.Serializer[Any]):
    amount_usd = serializers.CharField()
    window = serializers.CharField()


class KeyLimitsSerializer(serializers.Serializer[Any]):
    requests_per_minute = serializers.IntegerField(allow_null=True)
    tokens_per_minute = serializers.IntegerField(allow_null=True)
    max_concurrent_requests = serializers.IntegerField(allow_null=True)
    allowed_models = serializers.ListField(child=serializers.CharField())
    expires_at = serializers.DateTimeField(allow_null=True)
    spend_cap = SpendCapSerializer(allow_null=True)


class KeyWindowSerializer(serializers.Serializer[Any]):
    start = serializers.DateTimeField()
    resets_at = serializers.DateTimeField(allow_null=True)
    spent_usd = serializers.CharField()
    reserved_usd = serializers.CharField()


class KeyUsageSerializer(serializers.Serializer[Any]):
    total_spent_usd = serializers.CharField()
    total_requests = serializers.IntegerField()
    window = KeyWindowSerializer(allow_null=True, help_text="The spend cap's current window.")


class KeyRemainingSerializer(serializers.Serializer[Any]):
    spend_cap_usd = serializers.CharField(allow_null=True, help_text="Null: no cap.")
    wallet_available_usd = serializers.CharField()
    spend_usd = serializers.CharField(help_text="What this key can spend now: the smaller one.")


class CallingKeySerializer(serializers.Serializer[Any]):
    name = serializers.CharField()
    prefix = serializers.CharField()
    organization = serializers.CharField()
    created_at = serializers.DateTimeField()
    limits = KeyLimitsSerializer()
    usage = KeyUsageSerializer()
    remaining = KeyRemainingSerializer()


class CallingKey(APIView):
    """`GET /api/v1/key`: the calling API key's limits, usage and what remains."""

    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [AllowAny]

    @extend_schema(responses=CallingKeySerializer)
    def get(self, request: Request) -> Response:
        key = request.auth
        if not isinstance(key, ApiKey):
            raise NotAuthenticated("Send the API key as 'Authorization: Bearer sb_…'.")
        summary = key_spend_summary(api_key=key, now=timezone.now())
        wallet = Account.objects.filter(
            organization_id=key.organization_id, kind=Account.Kind.WALLET
        ).first()
        available = (wallet.balance_usd - wallet.reserved_usd) if wallet else ZERO_USD
        remaining: Decimal = (
            available if summary.remaining_usd is None else min(available, summary.remaining_usd)
        )
        window = None
        if summary.window_start is not None:
            window = {
                "start": summary.window_start,
                "resets_at": summary.window_resets_at,
                "spent_usd": format_usd(summary.window_spent_usd or ZERO_USD),
                "reserved_usd": format_usd(summary.window_reserved_usd or ZERO_USD),
            }
        data = {
            "name": key.name,
            "prefix": key.prefix,
            "organization": key.organization.slug,
            "created_at": key.created_at,
            "limits": {
                "requests_per_minute": key.requests_per_minute,
                "tokens_per_minute": key.tokens_per_minute,
                "max_concurrent_requests": key.max_concurrent_requests,
                "allowed_models": list(key.allowed_models or []),
                "expires_at": key.expires_at,
                "spend_cap": (
                    {"amount_usd": format_usd(summary.cap_usd), "window": summary.cap_window}
                    if summary.cap_usd is not None
                    else None
                ),
            },
            "usage": {
                "total_spent_usd": format_usd(summary.total_spent_usd),
                "total_requests": summary.total_requests,
                "window": window,
            },
            "remaining": {
                "spend_cap_usd": (
                    format_usd(summary.remaining_usd) if summary.remaining_usd is not None else None
                ),
                "wallet_available_usd": format_usd(available),
                "spend_usd": format_usd(max(ZERO_USD, remaining)),
            },
        }
        return Response(CallingKeySerializer(data).data)


class ApiKeyScheme(OpenApiAuthenticationExtension):
    """Describes API-key authentication (`GET /api/v1/key`) in the OpenAPI schema."""

    target_class = "billing.api.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "An API key, `sb_…`."}


class StatementSerializer(serializers.ModelSerializer[Statement]):
    opening_balance_usd = serializers.SerializerMethodField()
    closing_balance_usd = serializers.SerializerMethodField()

    class Meta:
        model = Statement
        fields = [
            "id",
            "period_start",
            "period_end",
            "opening_balance_usd",
            "closing_balance_usd",
            "issued_at",
        ]
        read_only_fields = fields

    def get_opening_balance_usd(self, statement: Statement) -> str:
        return format_usd(statement.opening_balance_usd)

    def get_closing_balance_usd(self, statement: Statement) -> str:
        return format_usd(statement.closing_balance_usd)


class StatementMovementSerializer(serializers.Serializer[Any]):
    section = serializers.CharField()
    label = serializers.CharField()  # type: ignore[assignment]  # the stubs type Field.label
    transactions = serializers.IntegerField()
    amount_usd = serializers.CharField(help_text="USD, signed: added to the wallet.")


class StatementUsageLineSerializer(serializers.Serializer[Any]):
    model = serializers.CharField()
    requests = serializers.IntegerField()
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    cached_input_tokens = serializers.IntegerField()
    cost_usd = serializers.CharField()


class StatementDetailSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    period_start = serializers.DateField()
    period_end = serializers.DateField(help_text="Exclusive: the first day of the next month.")
    opening_balance_usd = serializers.CharField()
    closing_balance_usd = serializers.CharField()
    issued_at = serializers.DateTimeField()
    movements = StatementMovementSerializer(many=True)
    usage_lines = StatementUsageLineSerializer(many=True)


class StatementList(OrganizationScoped):
    required_actions = {"GET": Action.BILLING_VIEW}

    @extend_schema(responses=StatementSerializer(many=True))
    def get(self, request: Request, organization: str) -> Response:
        """The organisation's monthly statements, newest first."""
        statements = statements_of_organization(organization_id=self.membership.organization_id)
        return Response(StatementSerializer(statements, many=True).data)


class _OneStatement(OrganizationScoped):
    required_actions = {"GET": Action.BILLING_VIEW}

    def statement(self, statement_id: int) -> Statement:
        """One of the organisation's statements; 404 for any other id, whoever owns it."""
        found = statement_get(
            organization_id=self.membership.organization_id, statement_id=statement_id
        )
        if found is None:
            raise NotFound("No such statement.")
        return found


class StatementDetail(_OneStatement):
    @extend_schema(responses=StatementDetailSerializer)
    def get(self, request: Request, organization: str, statement_id: int) -> Response:
        """A statement with its movements and its usage per model."""
        statement = self.statement(statement_id)
        figures = statement_figures(statement=statement)
        data = {
            **StatementSerializer(statement).data,
            "movements": [
                {
                    "section": m.section,
                    "label": m.label,
                    "transactions": m.transactions,
                    "amount_usd": format_usd(m.amount_usd),
                }
                for m in figures.movements
            ],
            "usage_lines": [
                {
                    "model": line.model,
                    "requests": line.requests,
                    "input_tokens": line.input_tokens,
                    "output_tokens": line.output_tokens,
                    "cached_input_tokens": line.cached_input_tokens,
                    "cost_usd": format_usd(line.cost_usd),
                }
                for line in figures.usage_lines
            ],
        }
        return Response(StatementDetailSerializer(data).data)


def _download(content: str | bytes, content_type: str, filename: str) -> HttpResponse:
    response = HttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


class StatementCsv(_OneStatement):
    @extend_schema(responses={(200, "text/csv"): OpenApiTypes.STR})
    def get(self, request: Request, organization: str, statement_id: int) -> HttpResponse:
        """The statement as CSV (the dashboard's download)."""
        statement = self.statement(statement_id)
        return _download(
            statement_csv(statement=statement),
            "text/csv",
            statement_filename(statement=statement, ext="csv"),
        )


class StatementPdf(_OneStatement):
    @extend_schema(responses={(200, "application/pdf"): OpenApiTypes.BINARY})
    def get(self, request: Request, organization: str, statement_id: int) -> HttpResponse:
        """The statement as PDF (the dashboard's download)."""
        statement = self.statement(statement_id)
        return _download(
            statement_pdf(statement=statement),
            "application/pdf",
            statement_filename(statement=statement, ext="pdf"),
        )


class DecimalTextField(serializers.CharField):
    """An exact decimal as text (a JSON integer is taken too). A JSON number with a fraction
    has been parsed into a float before any serializer sees it, and may already have lost
    digits, so it is refused rather than turned back into text."""

    def to_internal_value(self, data: Any) -> str:
        if isinstance(data, float):
            raise serializers.ValidationError(
                'Send the amount as a decimal string, e.g. "2.50": a JSON number is read as a '
                "float and may lose digits."
            )
        return super().to_internal_value(data)


class SpendCapSetSerializer(serializers.Serializer[Any]):
    amount_usd = DecimalTextField(help_text="USD per window, an exact decimal string.")
    window = serializers.ChoiceField(choices=SpendCap.Window.values, default=SpendCap.Window.MONTH)

    def validate_amount_usd(self, value: str) -> Any:
        try:
            return parse_usd(value)
        except MoneyError as exc:
            raise serializers.ValidationError(str(exc)) from None


class KeySpendCapSerializer(serializers.Serializer[Any]):
    key = ApiKeySerializer()
    spend_cap = SpendCapSerializer(allow_null=True, help_text="Null: no cap.")
    spent_total_usd = serializers.CharField()
    spent_in_window_usd = serializers.CharField(
        allow_null=True, help_text="What the key spent in its cap's current window."
    )


class ApiKeySpendCap(OrganizationScoped):
    """One key's spend cap and spend. Whoever manages the key reads it; admins and owners set
    and remove it (the limits rule of portal/permissions.py)."""

    def _answer(self, api_key: ApiKey) -> Response:
        cap = SpendCap.objects.filter(api_key=api_key).first()
        spend = api_key_spend(api_key_id=api_key.pk)
        data = {
            "key": api_key,
            "spend_cap": (
                {"amount_usd": format_usd(cap.amount_usd), "window": cap.window} if cap else None
            ),
            "spent_total_usd": format_usd(spend.total_usd),
            "spent_in_window_usd": (
                format_usd(spend.window_spent_usd) if spend.window_spent_usd is not None else None
            ),
        }
        return Response(KeySpendCapSerializer(data).data)

    @extend_schema(responses=KeySpendCapSerializer)
    def get(self, request: Request, organization: str, key_id: int) -> Response:
        return self._answer(api_key_or_404(self.membership, key_id))

    @extend_schema(request=SpendCapSetSerializer, responses=KeySpendCapSerializer)
    def put(self, request: Request, organization: str, key_id: int) -> Response:
        """Set the cap; the window's spend so far counts against a new amount."""
        api_key = api_key_or_404(self.membership, key_id)
        require_api(self.membership, Action.KEY_EDIT_LIMITS, api_key)
        body = SpendCapSetSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            spend_cap_set(
                api_key=api_key,
                amount_usd=body.validated_data["amount_usd"],
                window=SpendCap.Window(body.validated_data["window"]),
            )
        except BillingError as exc:
            raise ValidationError({"amount_usd": [str(exc)]}) from None
        return self._answer(api_key)

    @extend_schema(request=None, responses=KeySpendCapSerializer)
    def delete(self, request: Request, organization: str, key_id: int) -> Response:
        """Remove the cap: the key may spend the whole wallet."""
        api_key = api_key_or_404(self.membership, key_id)
        require_api(self.membership, Action.KEY_EDIT_LIMITS, api_key)
        spend_cap_set(api_key=api_key, amount_usd=None, window=SpendCap.Window.MONTH)
        return self._answer(api_key)
