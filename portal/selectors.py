"""Reads for organisations, memberships and API keys.

The dashboard reaches tenant rows only through the helpers here that take a membership (the
pair of an organisation and one of its users): a row outside it is "not found", never fetched
by id alone.
"""

from __future__ import annotations

import hashlib

from django.db.models import Case, QuerySet, When

from portal.models import ApiKey, Invitation, Membership, Organization, User
from portal.permissions import Action, can


class OrganizationNotFound(Exception):
    pass


class ApiKeyNotFound(Exception):
    pass


class MembershipNotFound(Exception):
    pass


class InvitationNotFound(Exception):
    pass


def organization_get(*, slug: str) -> Organization:
    try:
        return Organization.objects.get(slug=slug)
    except Organization.DoesNotExist:
        raise OrganizationNotFound(f"no organisation with slug {slug!r}") from None


def memberships_of_user(*, user: User) -> QuerySet[Membership]:
    """The user's memberships, oldest first (the first is their default organisation)."""
    return (
        Membership.objects.filter(user=user)
        .select_related("organization")
        .order_by("created_at", "pk")
    )


def membership_get(*, user: User, organization_slug: str | None = None) -> Membership:
    """The user's membership of the organisation with that slug, or of their first one.

    Raises OrganizationNotFound when the user does not belong to it (or to any).
    """
    memberships = memberships_of_user(user=user)
    if organization_slug is not None:
        memberships = memberships.filter(organization__slug=organization_slug)
    membership = memberships.first()
    if membership is None:
        raise OrganizationNotFound("no such organisation among the user's")
    return membership


def membership_manages_all_keys(*, membership: Membership) -> bool:
    """Owners and admins manage every key of the organisation; members only their own."""
    return can(membership, Action.KEY_VIEW_ALL)


def api_keys_manageable(*, membership: Membership) -> QuerySet[ApiKey]:
    """The organisation's keys this member may see and manage, newest first."""
    keys = ApiKey.objects.filter(organization_id=membership.organization_id)
    if not membership_manages_all_keys(membership=membership):
        keys = keys.filter(created_by_id=membership.user_id)
    return keys.order_by("-created_at", "-pk")


def api_key_get_manageable(*, membership: Membership, api_key_id: int) -> ApiKey:
    """One key this member may manage; ApiKeyNotFound for any other id."""
    try:
        return api_keys_manageable(membership=membership).get(pk=api_key_id)
    except ApiKey.DoesNotExist:
        raise ApiKeyNotFound(f"no API key #{api_key_id} here") from None


def members_of(*, membership: Membership) -> QuerySet[Membership]:
    """Everyone in the caller's organisation: the owner first, then by joining date."""
    return (
        Membership.objects.filter(organization_id=membership.organization_id)
        .select_related("user")
        .order_by(
            Case(
                When(role=Membership.Role.OWNER, then=0),
                When(role=Membership.Role.ADMIN, then=1),
                default=2,
            ),
            "created_at",
            "pk",
        )
    )


def member_get(*, membership: Membership, member_id: int) -> Membership:
    """A membership of the caller's organisation by id; MembershipNotFound for any other."""
    try:
        return Membership.objects.select_related("user").get(
            organization_id=membership.organization_id, pk=member_id
        )
    except Membership.DoesNotExist:
        raise MembershipNotFound(f"no member #{member_id} here") from None


def invitations_pending(*, membership: Membership) -> QuerySet[Invitation]:
    return Invitation.objects.filter(
        organization_id=membership.organization_id, state=Invitation.State.PENDING
    ).order_by("-created_at", "-pk")


def invitation_get(*, membership: Membership, invitation_id: int) -> Invitation:
    """An invitation of the caller's organisation by id; InvitationNotFound for any other."""
    try:
        return Invitation.objects.get(organization_id=membership.organization_id, pk=invitation_id)
    except Invitation.DoesNotExist:
        raise InvitationNotFound(f"no invitation #{invitation_id} here") from None


def invitation_by_token(*, token: str) -> Invitation:
    """The invitation an accept link points to (whatever its state); InvitationNotFound."""
    hashed = hashlib.sha256(token.encode()).hexdigest()
    try:
        return Invitation.objects.select_related("organization").get(hashed_token=hashed)
    except Invitation.DoesNotExist:
        raise InvitationNotFound("no such invitation") from None
