"""Reads for organisations, memberships and API keys.

The dashboard reaches tenant rows only through the helpers here that take a membership (the
pair of an organisation and one of its users): a row outside it is "not found", never fetched
by id alone.
"""

from __future__ import annotations

from django.db.models import QuerySet

from portal.models import ApiKey, Membership, Organization, User


class OrganizationNotFound(Exception):
    pass


class ApiKeyNotFound(Exception):
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
    return membership.role in {Membership.Role.OWNER, Membership.Role.ADMIN}


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
