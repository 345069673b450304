"""The management API's role matrix: each action tried by each role (and by an outsider).

Acme has an owner (Alice), an admin (Adam) and members (Bob, Mallory); Charlie owns Rival.
Mallory's key and a usage record on it are the objects acted upon; Bob is "a member" here.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from rest_framework.test import APIClient

from billing.models import SpendCap
from portal.models import ApiKey, Invitation, ManagementToken, Membership, User
from portal.services import api_key_create, invitation_create
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


def _mallory(team):
    return Membership.objects.get(organization=team.acme, user=team.mallory)


def _own_key(client, team):
    """A key of the caller's own (the outsider's lands in Rival, and is not Acme's)."""
    user = client.session.get("_auth_user_id")
    creator = User.objects.get(pk=user)
    return api_key_create(organization=team.acme, name="own", created_by=creator)[0]


def set_own_keys_limits(client, team, key):
    own = _own_key(client, team)
    response = client.patch(_key_url(team, own), {"requests_per_minute": 5}, format="json")
    own.refresh_from_db()
    return response.status_code, own.requests_per_minute == 5


def rename_own_key(client, team, key):
    own = _own_key(client, team)
    response = client.patch(_key_url(team, own), {"name": "renamed"}, format="json")
    own.refresh_from_db()
    return response.status_code, own.name == "renamed"


def rotate_others_key(client, team, key):
    response = client.post(_key_url(team, key, "rotate/"), {"overlap_hours": 1}, format="json")
    return response.status_code, ApiKey.objects.filter(rotated_from=key).exists()


def set_others_spend_cap(client, team, key):
    response = client.put(_key_url(team, key, "spend-cap/"), {"amount_usd": "1"}, format="json")
    return response.status_code, SpendCap.objects.filter(api_key=key).exists()


def set_own_spend_cap(client, team, key):
    own = _own_key(client, team)
    response = client.put(_key_url(team, own, "spend-cap/"), {"amount_usd": "1"}, format="json")
    return response.status_code, SpendCap.objects.filter(api_key=own).exists()


def list_invitations(client, team, key):
    invitation_create(
        organization=team.acme,
        email="dave@example.com",
        role="member",
        invited_by=team.alice,
        site_url="http://testserver/",
    )
    response = client.get(_org_url(team, "invitations/"))
    seen = response.status_code == 200 and [i["email"] for i in response.json()] == [
        "dave@example.com"
    ]
    return response.status_code, seen


def invite(client, team, key):
    response = client.post(
        _org_url(team, "invitations/"), {"email": "dave@example.com"}, format="json"
    )
    return response.status_code, Invitation.objects.exists()


def withdraw_invitation(client, team, key):
    invitation, _ = invitation_create(
        organization=team.acme,
        email="dave@example.com",
        role="member",
        invited_by=team.alice,
        site_url="http://testserver/",
    )
    response = client.post(_org_url(team, f"invitations/{invitation.pk}/revoke/"))
    invitation.refresh_from_db()
    return response.status_code, invitation.state == Invitation.State.REVOKED


def change_a_role(client, team, key):
    mallory = _mallory(team)
    response = client.patch(_org_url(team, f"members/{mallory.pk}/"), {"role": "admin"})
    mallory.refresh_from_db()
    return response.status_code, mallory.role == "admin"


def remove_a_member(client, team, key):
    mallory = _mallory(team)
    response = client.delete(_org_url(team, f"members/{mallory.pk}/"))
    return response.status_code, not Membership.objects.filter(pk=mallory.pk).exists()


def transfer_ownership(client, team, key):
    mallory = _mallory(team)
    response = client.post(_org_url(team, f"members/{mallory.pk}/transfer-ownership/"))
    mallory.refresh_from_db()
    return response.status_code, mallory.role == "owner"


def read_statements(client, team, key):
    response = client.get(_org_url(team, "statements/"))
    return response.status_code, response.status_code == 200


ACTIONS: dict[str, Action] = {
    "list members": list_members,
    "read the balance": read_balance,
    "create a key": create_key,
    "see another member's key": see_others_key,
    "change another member's key's limits": change_others_limits,
    "revoke another member's key": revoke_others_key,
    "see another member's usage": see_others_usage,
    "create a management token": create_token,
    "set own key's limits": set_own_keys_limits,
    "rename own key": rename_own_key,
    "rotate another member's key": rotate_others_key,
    "set another member's key's spend cap": set_others_spend_cap,
    "set own key's spend cap": set_own_spend_cap,
    "list invitations": list_invitations,
    "invite": invite,
    "withdraw an invitation": withdraw_invitation,
    "change a member's role": change_a_role,
    "remove a member": remove_a_member,
    "transfer ownership": transfer_ownership,
    "read statements": read_statements,
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
    # Limits are for admins and owners, even on a member's own key; renaming it is not.
    "set own key's limits": (ALLOWED, ALLOWED, REFUSED, HIDDEN),
    "rename own key": (ALLOWED, ALLOWED, ALLOWED, HIDDEN),
    "rotate another member's key": (ALLOWED, ALLOWED, HIDDEN, HIDDEN),
    "set another member's key's spend cap": (ALLOWED, ALLOWED, HIDDEN, HIDDEN),
    "set own key's spend cap": (ALLOWED, ALLOWED, REFUSED, HIDDEN),
    "list invitations": (ALLOWED, REFUSED, REFUSED, HIDDEN),
    "invite": (ALLOWED, REFUSED, REFUSED, HIDDEN),
    "withdraw an invitation": (ALLOWED, REFUSED, REFUSED, HIDDEN),
    "change a member's role": (ALLOWED, REFUSED, REFUSED, HIDDEN),
    "remove a member": (ALLOWED, REFUSED, REFUSED, HIDDEN),
    "transfer ownership": (ALLOWED, REFUSED, REFUSED, HIDDEN),
    "read statements": (ALLOWED, ALLOWED, ALLOWED, HIDDEN),
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
        ALLOWED: (status in (200, 201, 204), True),
        "not shown": (status == 200, False),
        REFUSED: (status == 403, False),
        HIDDEN: (status == 404, False),
    }[expected]
    assert (outcome[0], happened) == (True, outcome[1]), (who, action, status)
