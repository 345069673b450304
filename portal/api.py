"""The management API's organisation, member, API key and management token endpoints.

Every view under an organisation is `OrganizationScoped`: the caller's membership of the
organisation named in the URL is resolved before the view runs (404 for any other) and its role
checked against portal/permissions.py; the view reaches tenant rows only through selectors
that take that membership. Billing's endpoints (balance,
usage, the request log) live in billing/api.py.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api_auth import caller_memberships, is_token_call
from portal.api_base import OrganizationScoped
from portal.management_tokens import (
    management_token_create,
    management_token_get,
    management_token_revoke,
    management_tokens_of,
)
from portal.models import ApiKey, ManagementToken, Membership
from portal.permissions import Action
from portal.selectors import ApiKeyNotFound, api_key_get_manageable, api_keys_manageable
from portal.services import OrganizationError, api_key_create, api_key_revoke, api_key_update


class OrganizationSerializer(serializers.Serializer[Any]):
    slug = serializers.CharField(source="organization.slug")
    name = serializers.CharField(source="organization.name")
    created_at = serializers.DateTimeField(source="organization.created_at")
    role = serializers.CharField(help_text="The caller's role in this organisation.")


class MemberSerializer(serializers.Serializer[Any]):
    email = serializers.EmailField(source="user.email")
    name = serializers.CharField(source="user.name")
    role = serializers.CharField()
    joined_at = serializers.DateTimeField(source="created_at")


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    created_by = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "name",
            "prefix",
            "created_at",
            "created_by",
            "last_used_at",
            "revoked_at",
            "expires_at",
            "allowed_models",
            "requests_per_minute",
            "tokens_per_minute",
            "max_concurrent_requests",
        ]
        read_only_fields = fields

    def get_created_by(self, api_key: ApiKey) -> str | None:
        return api_key.created_by.email if api_key.created_by else None


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(help_text="The secret key. Shown only in this response.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class ApiKeyCreateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=100)


class ApiKeyUpdateSerializer(serializers.Serializer[Any]):
    """Only the fields sent change; null (or [] for allowed_models) means unlimited."""

    name = serializers.CharField(max_length=100, required=False)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)
    allowed_models = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False
    )
    requests_per_minute = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    tokens_per_minute = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    max_concurrent_requests = serializers.IntegerField(required=False, allow_null=True, min_value=1)


class ManagementTokenSerializer(serializers.ModelSerializer[ManagementToken]):
    created_by = serializers.EmailField(source="created_by.email", read_only=True)

    class Meta:
        model = ManagementToken
        fields = ["id", "name", "prefix", "role", "created_by", "created_at", "last_used_at"]
        fields += ["revoked_at"]
        read_only_fields = fields


class ManagementTokenCreatedSerializer(ManagementTokenSerializer):
    token = serializers.CharField(help_text="The secret token. Shown only in this response.")

    class Meta(ManagementTokenSerializer.Meta):
        fields = [*ManagementTokenSerializer.Meta.fields, "token"]
        read_only_fields = fields


class ManagementTokenCreateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=100)
    role = serializers.ChoiceField(choices=Membership.Role.choices, default=Membership.Role.MEMBER)


class OrganizationList(APIView):
    @extend_schema(responses=OrganizationSerializer(many=True))
    def get(self, request: Request) -> Response:
        """The organisations the caller belongs to (a token: its own)."""
        return Response(OrganizationSerializer(caller_memberships(request), many=True).data)


class OrganizationDetail(OrganizationScoped):
    required_actions = {"GET": Action.ORG_VIEW}

    @extend_schema(responses=OrganizationSerializer)
    def get(self, request: Request, organization: str) -> Response:
        return Response(OrganizationSerializer(self.membership).data)


class MemberList(OrganizationScoped):
    required_actions = {"GET": Action.MEMBER_VIEW}

    @extend_schema(responses=MemberSerializer(many=True))
    def get(self, request: Request, organization: str) -> Response:
        members = (
            Membership.objects.filter(organization_id=self.membership.organization_id)
            .select_related("user")
            .order_by("created_at", "pk")
        )
        return Response(MemberSerializer(members, many=True).data)


def _manageable_key(membership: Membership, key_id: int) -> ApiKey:
    try:
        return api_key_get_manageable(membership=membership, api_key_id=key_id)
    except ApiKeyNotFound:
        raise NotFound("No such API key.") from None


class ApiKeyList(OrganizationScoped):
    required_actions = {"GET": Action.ORG_VIEW, "POST": Action.KEY_CREATE}

    @extend_schema(responses=ApiKeySerializer(many=True))
    def get(self, request: Request, organization: str) -> Response:
        """Every key of the organisation for owners and admins; a member's own for members."""
        keys = api_keys_manageable(membership=self.membership).select_related("created_by")
        return Response(ApiKeySerializer(keys, many=True).data)

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer})
    def post(self, request: Request, organization: str) -> Response:
        """Create a key. The response carries the secret: it is never shown again."""
        membership = self.membership
        body = ApiKeyCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            api_key, secret = api_key_create(
                organization=membership.organization,
                name=body.validated_data["name"],
                created_by=membership.user,
            )
        except OrganizationError as exc:
            raise ValidationError({"name": [str(exc)]}) from None
        data = {**ApiKeySerializer(api_key).data, "key": secret}
        return Response(data, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})


class ApiKeyDetail(OrganizationScoped):
    @extend_schema(responses=ApiKeySerializer)
    def get(self, request: Request, organization: str, key_id: int) -> Response:
        return Response(ApiKeySerializer(_manageable_key(self.membership, key_id)).data)

    @extend_schema(request=ApiKeyUpdateSerializer, responses=ApiKeySerializer)
    def patch(self, request: Request, organization: str, key_id: int) -> Response:
        """Change the key's name or limits; gateways apply it within seconds."""
        api_key = _manageable_key(self.membership, key_id)
        body = ApiKeyUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        changes = body.validated_data
        try:
            api_key_update(
                api_key=api_key,
                name=changes.get("name", api_key.name),
                expires_at=changes.get("expires_at", api_key.expires_at),
                allowed_models=changes.get("allowed_models", api_key.allowed_models),
                requests_per_minute=changes.get("requests_per_minute", api_key.requests_per_minute),
                tokens_per_minute=changes.get("tokens_per_minute", api_key.tokens_per_minute),
                max_concurrent_requests=changes.get(
                    "max_concurrent_requests", api_key.max_concurrent_requests
                ),
            )
        except OrganizationError as exc:
            raise ValidationError({"detail": str(exc)}) from None
        return Response(ApiKeySerializer(api_key).data)


class ApiKeyRevoke(OrganizationScoped):
    @extend_schema(request=None, responses=ApiKeySerializer)
    def post(self, request: Request, organization: str, key_id: int) -> Response:
        """Revoke the key: every gateway refuses it within GATEWAY_KEY_CACHE_SECONDS."""
        api_key = _manageable_key(self.membership, key_id)
        api_key_revoke(api_key=api_key)
        return Response(ApiKeySerializer(api_key).data)


class _TokenManagement(OrganizationScoped):
    """Owners and admins signed in to the dashboard; a token cannot manage tokens."""

    required_actions = {"GET": Action.TOKEN_MANAGE, "POST": Action.TOKEN_MANAGE}

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if is_token_call(request):
            raise PermissionDenied("Management tokens are managed from a signed-in session.")


class ManagementTokenList(_TokenManagement):
    @extend_schema(responses=ManagementTokenSerializer(many=True))
    def get(self, request: Request, organization: str) -> Response:
        membership = self.membership
        tokens = management_tokens_of(organization=membership.organization)
        return Response(ManagementTokenSerializer(tokens, many=True).data)

    @extend_schema(
        request=ManagementTokenCreateSerializer, responses={201: ManagementTokenCreatedSerializer}
    )
    def post(self, request: Request, organization: str) -> Response:
        """Create a token for scripts. The response carries the secret: it is never shown again."""
        membership = self.membership
        body = ManagementTokenCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            token, secret = management_token_create(
                membership=membership,
                name=body.validated_data["name"],
                role=body.validated_data["role"],
            )
        except OrganizationError as exc:
            raise ValidationError({"detail": str(exc)}) from None
        data = {**ManagementTokenSerializer(token).data, "token": secret}
        return Response(data, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})


class ManagementTokenRevoke(_TokenManagement):
    @extend_schema(request=None, responses=ManagementTokenSerializer)
    def post(self, request: Request, organization: str, token_id: int) -> Response:
        membership = self.membership
        token = management_token_get(organization=membership.organization, token_id=token_id)
        if token is None:
            raise NotFound("No such management token.")
        management_token_revoke(token=token)
        return Response(ManagementTokenSerializer(token).data)


class UnknownEndpoint(APIView):
    """Any other path under /api/v1/: DRF's 404, in JSON like the rest of the API."""

    permission_classes = [AllowAny]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        raise NotFound("No such endpoint.")
