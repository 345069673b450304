"""The management API's billing endpoints: balance, usage over time, the request log, and
`GET /api/v1/key` (what the calling API key may still spend).

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
from django.db.models import QuerySet
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, NotAuthenticated, ValidationError
from rest_framework.generics import ListAPIView
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from billing.models import Account, UsageRecord
from billing.money import ZERO_USD, format_usd
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
from portal.api_base import OrganizationScoped
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
        raise ValidationError(form.errors.get_json_data())
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
