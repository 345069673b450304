"""Build test objects through the real services, so tests exercise the code users run."""

from __future__ import annotations

import itertools
from decimal import Decimal

from billing.services import credit_grant
from portal.models import ApiKey, Organization
from portal.services import api_key_create, organization_create

_sequence = itertools.count(1)


def make_org(*, name: str | None = None, credit_usd: str | None = "10") -> Organization:
    n = next(_sequence)
    organization = organization_create(name=name or f"Org {n}", owner_email=f"owner{n}@example.com")
    if credit_usd is not None:
        credit_grant(
            organization=organization, amount_usd=Decimal(credit_usd), reason="test credit"
        )
    return organization


def make_key(organization: Organization, *, name: str = "test key") -> tuple[ApiKey, str]:
    return api_key_create(organization=organization, name=name)
