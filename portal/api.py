"""The management API's organisation, member, invitation, API key and management token
endpoints.

Every view under an organisation is `OrganizationScoped`: the caller's membership of the
organisation named in the URL is resolved before the view runs (404 for any other) and its role
checked against portal/permissions.py; the view reaches tenant rows only through selectors
that take that membership. Billing's endpoints (balance, usage, the request log, statements,
a key's spend cap) live in billing/api.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from portal.api_auth import caller_memberships, caller_user, is_token_call
from portal.api_base import OrganizationScoped, require_api
from portal.management_tokens import (
    management_token_create,
    management_token_get,
    management_token_revoke,
    management_tokens_of,
)
from portal.models import ApiKey, Invitation, ManagementToken, Membership
from portal.permissions import Action
from portal.selectors import (
    ApiKeyNotFound,
    InvitationNotFound,
    MembershipNotFound,
    api_key_get_manageable,
    api_keys_manageable,
    invitation_get,
    invitations_pending,
    member_get,
    members_of,
)
from portal.services import (
    OrganizationError,
    api_key_create,
    api_key_revoke,
    api_key_rotate,
    api_key_update,
    invitation_create,
    invitation_revoke,
    membership_change_role,
    membership_remove,
    organization_create_for_user,
    ownership_transfer,
)


class OrganizationSerializer(serializers.Serializer[Any]):
    slug = serializers.CharField(source="organization.slug")
    name = serializers.CharField(source="organization.name")
    created_at = serializers.DateTimeField(source="organization.created_at")
    role = serializers.CharField(help_text="The caller's role in this organisation.")


class MemberSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField(help_text="The membership's id, for the member endpoints.")
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
            *ApiKey.LIMIT_FIELDS,
            "rotated_from",
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
    ip_allowlist = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        help_text="Addresses or CIDR networks the key may be used from; [] for any.",
    )


class ApiKeyRotateSerializer(serializers.Serializer[Any]):
    # Bounded here as well as by the service: timedelta(hours=10**13) overflows.
    overlap_hours = serializers.IntegerField(
        min_value=0,
        max_value=settings.API_KEY_MAX_ROTATION_OVERLAP_HOURS,
        help_text="How long the old key keeps working, in hours "
        "(at most API_KEY_MAX_ROTATION_OVERLAP_HOURS).",
    )


class ApiKeyRotatedSerializer(ApiKeyCreatedSerializer):
    """The new key (its secret shown only here); `rotated_from` names the old one."""


class MemberRoleSerializer(serializers.Serializer[Any]):
    role = serializers.ChoiceField(choices=[Membership.Role.MEMBER, Membership.Role.ADMIN])


class InvitationSerializer(serializers.ModelSerializer[Invitation]):
    invited_by = serializers.SerializerMethodField()

    class Meta:
        model = Invitation
        fields = ["id", "email", "role", "state", "invited_by", "created_at", "expires_at"]
        read_only_fields = fields

    def get_invited_by(self, invitation: Invitation) -> str | None:
        return invitation.invited_by.email if invitation.invited_by else None


class InvitationCreateSerializer(serializers.Serializer[Any]):
    email = serializers.EmailField()
    role = serializers.ChoiceField(
        choices=[Membership.Role.MEMBER, Membership.Role.ADMIN], default=Membership.Role.MEMBER
    )


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


class OrganizationCreateSerializer(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=200)


class OrganizationList(APIView):
    @extend_schema(responses=OrganizationSerializer(many=True))
    def get(self, request: Request) -> Response:
        """The organisations the caller belongs to (a token: its own)."""
        return Response(OrganizationSerializer(caller_memberships(request), many=True).data)

    @extend_schema(request=OrganizationCreateSerializer, responses={201: OrganizationSerializer})
    def post(self, request: Request) -> Response:
        """Create another organisation, owned by the signed-in user. A management token belongs
        to one organisation and cannot create others."""
        if is_token_call(request):
            raise PermissionDenied("Organisations are created from a signed-in session.")
        user = caller_user(request)
        body = OrganizationCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            organization = organization_create_for_user(user=user, name=body.validated_data["name"])
        except OrganizationError as exc:
            raise ValidationError({"name": [str(exc)]}) from None
        membership = Membership.objects.select_related("organization").get(
            organization=organization, user=user
        )
        return Response(OrganizationSerializer(membership).data, status=status.HTTP_201_CREATED)


class OrganizationDetail(OrganizationScoped):
    required_actions = {"GET": Action.ORG_VIEW}

    @extend_schema(responses=OrganizationSerializer)
    def get(self, request: Request, organization: str) -> Response:
        return Response(OrganizationSerializer(self.membership).data)


class MemberList(OrganizationScoped):
    required_actions = {"GET": Action.MEMBER_VIEW}

    @extend_schema(responses=MemberSerializer(many=True))
    def get(self, request: Request, organization: str) -> Response:
        """The members, as the organisation page lists them: the owner, admins, then members."""
        return Response(MemberSerializer(members_of(membership=self.membership), many=True).data)


def _member(membership: Membership, member_id: int) -> Membership:
    try:
        return member_get(membership=membership, member_id=member_id)
    except MembershipNotFound:
        raise NotFound("No such member.") from None


def _refused_by_service(exc: OrganizationError) -> ValidationError:
    return ValidationError({"detail": str(exc)})


class MemberDetail(OrganizationScoped):
    required_actions = {"GET": Action.MEMBER_VIEW}

    @extend_schema(responses=MemberSerializer)
    def get(self, request: Request, organization: str, member_id: int) -> Response:
        return Response(MemberSerializer(_member(self.membership, member_id)).data)

    @extend_schema(request=MemberRoleSerializer, responses=MemberSerializer)
    def patch(self, request: Request, organization: str, member_id: int) -> Response:
        """Make a member an admin or back (owners only; the owner changes by transfer)."""
        member = _member(self.membership, member_id)
        require_api(self.membership, Action.MEMBER_CHANGE_ROLE, member)
        body = MemberRoleSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            member = membership_change_role(membership=member, role=body.validated_data["role"])
        except OrganizationError as exc:
            raise _refused_by_service(exc) from None
        return Response(MemberSerializer(member).data)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "revoke_keys",
                OpenApiTypes.BOOL,
                description="Also revoke the keys they created (else those keep working).",
            )
        ],
        responses={204: None},
    )
    def delete(self, request: Request, organization: str, member_id: int) -> Response:
        """Remove a member (owners only; never the owner)."""
        member = _member(self.membership, member_id)
        require_api(self.membership, Action.MEMBER_REMOVE, member)
        revoke = request.query_params.get("revoke_keys", "").lower() in {"1", "true", "yes"}
        try:
            membership_remove(membership=member, revoke_their_keys=revoke)
        except OrganizationError as exc:
            raise _refused_by_service(exc) from None
        return Response(status=status.HTTP_204_NO_CONTENT)


class OwnershipTransfer(OrganizationScoped):
    required_actions = {"POST": Action.ORG_TRANSFER}

    @extend_schema(request=None, responses=MemberSerializer(many=True))
    def post(self, request: Request, organization: str, member_id: int) -> Response:
        """Make this member the owner; the previous owner stays on as an admin. Answers the
        members with their new roles."""
        member = _member(self.membership, member_id)
        try:
            ownership_transfer(organization=self.membership.organization, to_membership=member)
        except OrganizationError as exc:
            raise _refused_by_service(exc) from None
        return Response(MemberSerializer(members_of(membership=self.membership), many=True).data)


class InvitationList(OrganizationScoped):
    required_actions = {"GET": Action.MEMBER_INVITE, "POST": Action.MEMBER_INVITE}

    @extend_schema(responses=InvitationSerializer(many=True))
    def get(self, request: Request, organization: str) -> Response:
        """The pending invitations (owners only)."""
        pending = invitations_pending(membership=self.membership).select_related("invited_by")
        return Response(InvitationSerializer(pending, many=True).data)

    @extend_schema(request=InvitationCreateSerializer, responses={201: InvitationSerializer})
    def post(self, request: Request, organization: str) -> Response:
        """Invite an address as member or admin; the accept link goes to it by e-mail only. A
        pending invitation to the same address is replaced."""
        body = InvitationCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            invitation, _ = invitation_create(
                organization=self.membership.organization,
                email=body.validated_data["email"],
                role=body.validated_data["role"],
                invited_by=self.membership.user,
                site_url=request.build_absolute_uri("/"),
            )
        except OrganizationError as exc:
            raise _refused_by_service(exc) from None
        return Response(InvitationSerializer(invitation).data, status=status.HTTP_201_CREATED)


class InvitationRevoke(OrganizationScoped):
    # Refused for the role before the lookup, so a member learns nothing of which ids exist.
    required_actions = {"POST": Action.INVITATION_REVOKE}

    @extend_schema(request=None, responses=InvitationSerializer)
    def post(self, request: Request, organization: str, invitation_id: int) -> Response:
        """Withdraw a pending invitation: its link stops working."""
        try:
            invitation = invitation_get(membership=self.membership, invitation_id=invitation_id)
        except InvitationNotFound:
            raise NotFound("No such invitation.") from None
        require_api(self.membership, Action.INVITATION_REVOKE, invitation)
        invitation_revoke(invitation=invitation)
        invitation.refresh_from_db()
        return Response(InvitationSerializer(invitation).data)


def api_key_or_404(membership: Membership, key_id: int) -> ApiKey:
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
        return Response(ApiKeySerializer(api_key_or_404(self.membership, key_id)).data)

    @extend_schema(request=ApiKeyUpdateSerializer, responses=ApiKeySerializer)
    def patch(self, request: Request, organization: str, key_id: int) -> Response:
        """Change the key's name (whoever manages the key) or limits (admins and owners);
        gateways apply it within seconds."""
        api_key = api_key_or_404(self.membership, key_id)
        body = ApiKeyUpdateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        changes = body.validated_data
        if any(field in changes for field in ApiKey.LIMIT_FIELDS):  # admins' and owners'
            require_api(self.membership, Action.KEY_EDIT_LIMITS, api_key)
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
                ip_allowlist=changes.get("ip_allowlist", api_key.ip_allowlist),
            )
        except OrganizationError as exc:
            raise ValidationError({"detail": str(exc)}) from None
        return Response(ApiKeySerializer(api_key).data)


class ApiKeyRevoke(OrganizationScoped):
    @extend_schema(request=None, responses=ApiKeySerializer)
    def post(self, request: Request, organization: str, key_id: int) -> Response:
        """Revoke the key: every gateway refuses it within GATEWAY_KEY_CACHE_SECONDS."""
        api_key = api_key_or_404(self.membership, key_id)
        api_key_revoke(api_key=api_key)
        return Response(ApiKeySerializer(api_key).data)


class ApiKeyRotate(OrganizationScoped):
    @extend_schema(request=ApiKeyRotateSerializer, responses={201: ApiKeyRotatedSerializer})
    def post(self, request: Request, organization: str, key_id: int) -> Response:
        """Replace the key with a new one (same name, limits and spend cap); the old one keeps
        working for `overlap_hours`, then expires. The answer carries the new secret, once."""
        api_key = api_key_or_404(self.membership, key_id)
        require_api(self.membership, Action.KEY_MANAGE, api_key)
        body = ApiKeyRotateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            new_key, secret = api_key_rotate(
                api_key=api_key, overlap=timedelta(hours=body.validated_data["overlap_hours"])
            )
        except OrganizationError as exc:
            raise _refused_by_service(exc) from None
        data = {**ApiKeySerializer(new_key).data, "key": secret}
        return Response(data, status=status.HTTP_201_CREATED, headers={"Cache-Control": "no-store"})


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
