from datetime import date

import pytest
from django.test import Client

from billing.statements import statement_issue
from portal.models import Membership
from portal.services import api_key_create
from tests.factories import make_org, make_usage
from tests.portal.api_helpers import Team, make_team


@pytest.fixture
def team(db) -> Team:
    return make_team()


@pytest.fixture
def acme_pages(db) -> tuple[Client, dict[str, str]]:
    """Acme's owner, signed in, with a key, usage and a statement to show; the ids to fill the
    pages' paths with (`org`, `key`, `statement`)."""
    acme = make_org(name="Acme", credit_usd="10")
    make_org(name="Rival", credit_usd="10")  # another organisation's data exists too
    owner = Membership.objects.get(organization=acme).user
    key, _ = api_key_create(organization=acme, name="ci", created_by=owner)
    make_usage(key)
    statement = statement_issue(organization_id=acme.pk, period_start=date(2026, 10, 1))
    client = Client()
    client.force_login(owner)
    ids = {"org": acme.slug, "key": str(key.pk), "statement": str(statement.pk)}
    return client, ids
