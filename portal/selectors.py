"""Reads for organisations and API keys."""

from __future__ import annotations

from portal.models import Organization


class OrganizationNotFound(Exception):
    pass


def organization_get(*, slug: str) -> Organization:
    try:
        return Organization.objects.get(slug=slug)
    except Organization.DoesNotExist:
        raise OrganizationNotFound(f"no organisation with slug {slug!r}") from None
