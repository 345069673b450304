"""Reads for organisations and API keys."""

from __future__ import annotations

from portal.models import ApiKey, Organization


class OrganizationNotFound(Exception):
    pass


def organization_get(*, slug: str) -> Organization:
    try:
        return Organization.objects.get(slug=slug)
    except Organization.DoesNotExist:
        raise OrganizationNotFound(f"no organisation with slug {slug!r}") from None


async def api_key_find(*, hashed_key: str) -> ApiKey | None:
    """The key with this hash (revoked or not), or None. One indexed query."""
    return await ApiKey.objects.filter(hashed_key=hashed_key).afirst()
