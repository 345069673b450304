"""The management API's role matrix: each action tried by each role (and by an outsider).

Acme has an owner (Alice), an admin (Adam) and members (Bob, Mallory); Charlie owns Rival.
Mallory's key and a usage record on it are the objects acted upon; Bob is "a member" here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from rest_framework.test import APIClient

from portal.models import ApiKey, ManagementToken
from portal.services import api_key_create
from tests.factories import make_usage
from tests.portal.api_helpers import Team, as_user

ALLOWED, REFUSED, HIDDEN = "allowed", "refused (403)", "hidden (404)"


def _key_url(team: Team, key: ApiKey, tail: str = "") -> str:
    return f"/api/v1/organizations/{team.acme.slug}/keys/{key.pk}/{tail}"


def _org_url(team: Team, tail: str) -> str:
    return f"/api/v1/organizations/{team.acme.slug}/{tail}"


Action = Callable[[APIClient, Team, ApiKey], tuple[int, bool]]


def list_members(client, team, key):
    response = client.get(_org_url(team, "members/"))
    return response.status_code, response.status_code == 200


def read_balance(client, team, key):
    response = client.get(_org_url(team, "balance/"))
    return response.status_code, "balance_usd" in response.json()


def create_key(client, team, key):
    response = client.post(_org_url(team, "keys/"), {"name": "new"}, format="json")
    return response.status_code, ApiKey.objects.filter(name="new").exists()


def see_others_key(client, team, key):
    response = client.get(_org_url(team, "keys/"))
    seen = response.status_code == 200 and key.pk in {k["id"] for k in response.json()}
    return response.status_code, seen


def change_others_limits(client, team, key):
    response = client.patch(_key_url(team, key), {"requests_per_minute": 5}, format="json")
    key.refresh_from_db()
    return response.status_code, key.requests_per_minute == 5


def revoke_others_key(client, team, key):
    response = client.post(_key_url(team, key, "revoke/"))
    key.refresh_from_db()
    return response.status_code, key.revoked_at is not None


def see_others_usage(client, team, key):
    response = client.get(_org_url(team, "requests/"))
    seen = response.status_code == 200 and any(
        r["api_key_id"] == key.pk for r in response.json()["results"]
    )
    return response.status_code, seen


def create_token(client, team, key):
    response = client.post(_org_url(team, "tokens/"), {"name": "t"}, format="json")
    return response.status_code, ManagementToken.objects.exists()


ACTIONS: dict[str, Action] = {
    "list members": list_members,
    "read the balance": read_balance,
    "create a key": create_key,
    "see another member's key": see_others_key,
    "change another member's key's limits": change_others_limits,
    "revoke another member's key": revoke_others_key,
    "see another member's usage": see_others_usage,
    "create a management token": create_token,
}

# Expected outcome per action for: owner, admin, member, outsider.
MATRIX: dict[str, tuple[str, str, str, str]] = {
    "list members": (ALLOWED, ALLOWED, ALLOWED, HIDDEN),
    "read the balance": (ALLOWED, ALLOWED, ALLOWED, HIDDEN),
    "create a key": (ALLOWED, ALLOWED, ALLOWED, HIDDEN),
    # A member's key list answers 200 but leaves the key out.
    "see another member's key": (ALLOWED, ALLOWED, "not shown", HIDDEN),
    "change another member's key's limits": (ALLOWED, ALLOWED, HIDDEN, HIDDEN),
    "revoke another member's key": (ALLOWED, ALLOWED, HIDDEN, HIDDEN),
    "see another member's usage": (ALLOWED, ALLOWED, "not shown", HIDDEN),
    "create a management token": (ALLOWED, ALLOWED, REFUSED, HIDDEN),
}
ROLES = ("alice", "adam", "bob", "charlie")  # owner, admin, member, outsider


def test_the_matrix_names_every_action():
    assert set(MATRIX) == set(ACTIONS)


@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("who", ROLES)
def test_each_role_each_action(team, action, who):
    key, _ = api_key_create(organization=team.acme, name="mallory-key", created_by=team.mallory)
    make_usage(key)
    expected = MATRIX[action][ROLES.index(who)]

    status, happened = ACTIONS[action](as_user(getattr(team, who)), team, key)

    outcome: tuple[bool, bool] = {
        ALLOWED: (status in (200, 201), True),
        "not shown": (status == 200, False),
        REFUSED: (status == 403, False),
        HIDDEN: (status == 404, False),
    }[expected]
    assert (outcome[0], happened) == (True, outcome[1]), (who, action, status)
