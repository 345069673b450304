"""The role matrix: every organisation action tried by the owner, an admin, a member and an
outsider (the owner of another organisation). An allowed action changes what it should; a
refused one answers 403 (a member of the organisation without the role) or 404 (someone who
may not even see the object) and changes nothing.

The rules under test live in portal/permissions.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.test import Client

from billing.models import BillingAlertSettings, SpendCap
from portal.management_tokens import management_token_create
from portal.models import ApiKey, Invitation, ManagementToken, Membership, Organization, User
from portal.permissions import ROLES_ALLOWED, Action, can
from portal.services import api_key_create, invitation_create
from tests.factories import make_org

OK = "ok"


@dataclass
class World:
    acme: Organization
    users: dict[str, User]  # owner, admin, member, outsider
    target: Membership  # mallory, a plain member others act upon
    target_key: ApiKey  # created by mallory
    own_keys: dict[str, ApiKey]  # a key created by each role, in acme (not for the outsider)
    invitation: Invitation
    token: ManagementToken  # the owner's management token


def _join(organization: Organization, email: str, role: str) -> Membership:
    user = User.objects.create_user(email=email, password=None)
    return Membership.objects.create(organization=organization, user=user, role=role)


@pytest.fixture
def world(db) -> World:
    acme = make_org(name="Acme", credit_usd=None)
    rival = make_org(name="Rival", credit_usd=None)
    owner = Membership.objects.get(organization=acme).user
    admin = _join(acme, "ada@example.com", Membership.Role.ADMIN).user
    member = _join(acme, "bob@example.com", Membership.Role.MEMBER).user
    target = _join(acme, "mallory@example.com", Membership.Role.MEMBER)
    users = {
        "owner": owner,
        "admin": admin,
        "member": member,
        "outsider": Membership.objects.get(organization=rival).user,
    }
    own_keys = {
        role: api_key_create(organization=acme, name=f"{role}'s", created_by=user)[0]
        for role, user in users.items()
        if role != "outsider"
    }
    invitation, _ = invitation_create(
        organization=acme,
        email="newbie@example.com",
        role=Membership.Role.MEMBER,
        invited_by=owner,
        site_url="http://testserver/",
    )
    return World(
        acme=acme,
        users=users,
        target=target,
        target_key=api_key_create(organization=acme, name="mallory's", created_by=target.user)[0],
        own_keys=own_keys,
        invitation=invitation,
        token=management_token_create(
            membership=Membership.objects.get(user=owner), name="script", role="member"
        )[0],
    )


def snapshot() -> tuple[object, ...]:
    """Everything an action could change."""
    return (
        sorted(Membership.objects.values_list("organization_id", "user_id", "role")),
        sorted(Invitation.objects.values_list("pk", "email", "state")),
        sorted(
            ApiKey.objects.values_list(
                "pk", "name", "revoked_at", "expires_at", "requests_per_minute", "ip_allowlist"
            )
        ),
        Organization.objects.count(),
        sorted(SpendCap.objects.values_list("api_key_id", "amount_usd")),
        sorted(ManagementToken.objects.values_list("pk", "revoked_at")),
        sorted(BillingAlertSettings.objects.values_list("organization_id", "billing_email")),
    )


LIMITS = {"requests_per_minute": "7", "spend_cap_usd": "3", "spend_cap_window": "day"}

# action -> (method, path given the world and role, form data, expected per role)
Request = Callable[[World, str], str]
MATRIX: dict[str, tuple[str, Request, dict[str, str], dict[str, object]]] = {
    "view members": (
        "get",
        lambda w, r: "/dashboard/org/",
        {},
        {"owner": 200, "admin": 200, "member": 200, "outsider": 404},
    ),
    "invite": (
        "post",
        lambda w, r: "/dashboard/org/invite",
        {"email": "zed@example.com", "role": "admin"},
        {"owner": OK, "admin": 403, "member": 403, "outsider": 404},
    ),
    "withdraw an invitation": (
        "post",
        lambda w, r: f"/dashboard/org/invitations/{w.invitation.pk}/revoke",
        {},
        {"owner": OK, "admin": 403, "member": 403, "outsider": 404},
    ),
    "change a role": (
        "post",
        lambda w, r: f"/dashboard/org/members/{w.target.pk}/role",
        {"role": "admin"},
        {"owner": OK, "admin": 403, "member": 403, "outsider": 404},
    ),
    "remove a member": (
        "post",
        lambda w, r: f"/dashboard/org/members/{w.target.pk}/remove",
        {},
        {"owner": OK, "admin": 403, "member": 403, "outsider": 404},
    ),
    "transfer ownership": (
        "post",
        lambda w, r: f"/dashboard/org/members/{w.target.pk}/transfer",
        {},
        {"owner": OK, "admin": 403, "member": 403, "outsider": 404},
    ),
    "leave": (
        "post",
        lambda w, r: "/dashboard/org/leave",
        {},
        # The owner is told to transfer ownership first (a message, nothing changes).
        {"owner": 302, "admin": OK, "member": OK, "outsider": 404},
    ),
    "create a key": (
        "post",
        lambda w, r: "/dashboard/keys/create",
        {"name": "new"},
        {"owner": OK, "admin": OK, "member": OK, "outsider": 404},
    ),
    "see another's key": (
        "get",
        lambda w, r: f"/dashboard/keys/{w.target_key.pk}/",
        {},
        {"owner": 200, "admin": 200, "member": 404, "outsider": 404},
    ),
    "rename another's key": (
        "post",
        lambda w, r: f"/dashboard/keys/{w.target_key.pk}/rename",
        {"name": "renamed"},
        {"owner": OK, "admin": OK, "member": 404, "outsider": 404},
    ),
    "revoke another's key": (
        "post",
        lambda w, r: f"/dashboard/keys/{w.target_key.pk}/revoke",
        {},
        {"owner": OK, "admin": OK, "member": 404, "outsider": 404},
    ),
    "rotate another's key": (
        "post",
        lambda w, r: f"/dashboard/keys/{w.target_key.pk}/rotate",
        {"overlap_hours": "1"},
        {"owner": OK, "admin": OK, "member": 404, "outsider": 404},
    ),
    "set another key's limits": (
        "post",
        lambda w, r: f"/dashboard/keys/{w.target_key.pk}/",
        LIMITS,
        {"owner": OK, "admin": OK, "member": 404, "outsider": 404},
    ),
    "rename own key": (
        "post",
        lambda w, r: f"/dashboard/keys/{w.own_keys[r].pk}/rename",
        {"name": "renamed"},
        {"owner": OK, "admin": OK, "member": OK},
    ),
    "rotate own key": (
        "post",
        lambda w, r: f"/dashboard/keys/{w.own_keys[r].pk}/rotate",
        {"overlap_hours": "1"},
        {"owner": OK, "admin": OK, "member": OK},
    ),
    "revoke own key": (
        "post",
        lambda w, r: f"/dashboard/keys/{w.own_keys[r].pk}/revoke",
        {},
        {"owner": OK, "admin": OK, "member": OK},
    ),
    "revoke a management token": (
        "post",
        lambda w, r: f"/dashboard/tokens/{w.token.pk}/revoke",
        {},
        {"owner": OK, "admin": OK, "member": 403, "outsider": 404},
    ),
    "change billing alert settings": (
        "post",
        lambda w, r: "/dashboard/statements/alerts",
        {"billing_email": "books@example.com", "low_balance_threshold": "5"},
        {"owner": OK, "admin": OK, "member": 403, "outsider": 404},
    ),
    "set own key's limits": (
        "post",
        lambda w, r: f"/dashboard/keys/{w.own_keys[r].pk}/",
        LIMITS,
        {"owner": OK, "admin": OK, "member": 403},
    ),
}

CASES = [
    pytest.param(action, role, id=f"{action}-{role}")
    for action, (_, _, _, expected) in MATRIX.items()
    for role in expected
]


@pytest.mark.parametrize(("action", "role"), CASES)
def test_role_matrix(world, action, role):
    method, path, data, expected = MATRIX[action]
    client = Client()
    client.force_login(world.users[role])
    before = snapshot()

    if method == "get":
        response = client.get(path(world, role), {"org": world.acme.slug})
    else:
        response = client.post(path(world, role), {**data, "org": world.acme.slug})

    outcome = expected[role]
    if outcome == OK:
        assert response.status_code in {200, 302}, response.content[:300]
        assert snapshot() != before, f"{role} was allowed to {action} but nothing changed"
    else:
        assert response.status_code == outcome
        assert snapshot() == before, f"{role} was refused {action} but something changed"


def test_every_action_has_its_roles_and_an_outsider_may_do_none():
    # A new Action without roles would raise KeyError in can(); add it to MATRIX above too.
    assert set(ROLES_ALLOWED) == set(Action)
    for action in Action:
        assert can(None, action) is False


def test_the_owners_membership_cannot_be_removed_or_demoted_even_by_the_owner(world):
    owner = Membership.objects.get(organization=world.acme, role=Membership.Role.OWNER)

    assert not can(owner, Action.MEMBER_REMOVE, owner)
    assert not can(owner, Action.MEMBER_CHANGE_ROLE, owner)
    assert not can(owner, Action.ORG_LEAVE)


def test_an_object_of_another_organisation_is_never_allowed(world):
    rival_owner = Membership.objects.get(user=world.users["outsider"])

    assert not can(rival_owner, Action.KEY_MANAGE, world.target_key)
    assert not can(rival_owner, Action.KEY_EDIT_LIMITS, world.target_key)
    assert not can(rival_owner, Action.MEMBER_REMOVE, world.target)
