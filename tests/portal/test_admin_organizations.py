"""The operator's organisation admin keeps an organisation to one owner."""

from __future__ import annotations

import pytest

from portal.models import Membership, Organization, User

pytestmark = pytest.mark.django_db


def _form(*members: tuple[User, str]) -> dict[str, object]:
    form: dict[str, object] = {
        "name": "Acme",
        "slug": "acme",
        "membership_set-TOTAL_FORMS": len(members),
        "membership_set-INITIAL_FORMS": 0,
    }
    for n, (user, role) in enumerate(members):
        form |= {f"membership_set-{n}-user": user.pk, f"membership_set-{n}-role": role}
    return form


def test_two_owners_in_one_save_are_refused_with_a_message(admin_client):
    alice = User.objects.create_user(email="alice@example.com")
    bob = User.objects.create_user(email="bob@example.com")

    response = admin_client.post(
        "/admin/portal/organization/add/", _form((alice, "owner"), (bob, "owner"))
    )

    assert response.status_code == 200
    assert "one owner" in response.content.decode()
    assert not Organization.objects.filter(slug="acme").exists()


def test_an_owner_and_an_admin_are_saved(admin_client):
    alice = User.objects.create_user(email="alice@example.com")
    bob = User.objects.create_user(email="bob@example.com")

    response = admin_client.post(
        "/admin/portal/organization/add/", _form((alice, "owner"), (bob, "admin"))
    )

    assert response.status_code == 302
    roles = Membership.objects.filter(organization__slug="acme").values_list("user__email", "role")
    assert sorted(roles) == [("alice@example.com", "owner"), ("bob@example.com", "admin")]
