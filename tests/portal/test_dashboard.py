"""The dashboard: the current organisation, its balance and API keys, by role.

Alice owns the organisation, Bob and Mallory are plain members of it, and Charlie belongs
only to another organisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from django.test import Client

from portal import api_keys
from portal.models import ApiKey, Membership, Organization, User
from portal.services import api_key_create
from tests.factories import make_org


@dataclass
class Team:
    organization: Organization
    alice: User
    bob: User
    mallory: User
    other_organization: Organization
    charlie: User


def _member(organization: Organization, email: str, role: str = Membership.Role.MEMBER) -> User:
    user = User.objects.create_user(email=email, password=None)
    Membership.objects.create(organization=organization, user=user, role=role)
    return user


@pytest.fixture
def team(db) -> Team:
    organization = make_org(name="Acme", credit_usd="12.5")
    other = make_org(name="Rival", credit_usd="99")
    return Team(
        organization=organization,
        alice=Membership.objects.get(organization=organization).user,
        bob=_member(organization, "bob@example.com"),
        mallory=_member(organization, "mallory@example.com"),
        other_organization=other,
        charlie=Membership.objects.get(organization=other).user,
    )


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_it_redirects_anonymous_users_to_login(client, team):
    key, _ = api_key_create(organization=team.organization, name="ci")

    for response in (
        client.get("/dashboard/"),
        client.post("/dashboard/keys/create", {"name": "x"}),
        client.post(f"/dashboard/keys/{key.pk}/revoke"),
    ):
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")
    key.refresh_from_db()
    assert key.revoked_at is None
    assert ApiKey.objects.filter(name="x").count() == 0


def test_the_owner_sees_the_balance_and_every_key(team):
    by_alice, _ = api_key_create(
        organization=team.organization, name="alice-key", created_by=team.alice
    )
    by_bob, _ = api_key_create(organization=team.organization, name="bob-key", created_by=team.bob)
    rival, _ = api_key_create(organization=team.other_organization, name="rival-key")

    response = _client(team.alice).get("/dashboard/")

    assert response.status_code == 200
    assert response.context["organization"] == team.organization
    assert list(response.context["api_keys"]) == [by_bob, by_alice]
    page = response.content.decode()
    assert "12.5000000000" in page
    assert by_bob.prefix in page and by_alice.prefix in page
    assert rival.prefix not in page and "rival-key" not in page and "99.0000000000" not in page


def test_a_member_sees_only_their_own_keys(team):
    by_alice, _ = api_key_create(
        organization=team.organization, name="alice-key", created_by=team.alice
    )
    by_bob, _ = api_key_create(organization=team.organization, name="bob-key", created_by=team.bob)

    response = _client(team.bob).get("/dashboard/")

    assert list(response.context["api_keys"]) == [by_bob]
    assert by_alice.prefix not in response.content.decode()


def test_creating_a_key_shows_its_secret_once_and_it_authenticates(team):
    client = _client(team.bob)

    response = client.post("/dashboard/keys/create", {"name": "backend"})

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    secret = response.context["secret"]
    assert secret in response.content.decode()
    assert api_keys.is_well_formed(secret)
    key = ApiKey.objects.get(name="backend")
    assert key.organization == team.organization
    assert key.created_by == team.bob
    assert key.hashed_key == api_keys.hash_key(secret)
    dashboard = client.get("/dashboard/")
    assert key.prefix in dashboard.content.decode()
    assert secret not in dashboard.content.decode()


def test_a_key_needs_a_name(team):
    client = _client(team.alice)

    response = client.post("/dashboard/keys/create", {"name": "  "}, follow=True)

    assert "an API key needs a name" in response.content.decode()
    assert not ApiKey.objects.filter(organization=team.organization).exists()


def test_the_owner_revokes_any_key_of_the_organisation(team):
    key, _ = api_key_create(organization=team.organization, name="bob-key", created_by=team.bob)

    response = _client(team.alice).post(f"/dashboard/keys/{key.pk}/revoke")

    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_a_member_revokes_their_own_key_but_not_another_members(team):
    own, _ = api_key_create(organization=team.organization, name="bob-key", created_by=team.bob)
    others, _ = api_key_create(
        organization=team.organization, name="mallory-key", created_by=team.mallory
    )
    client = _client(team.bob)

    assert client.post(f"/dashboard/keys/{others.pk}/revoke").status_code == 404
    assert client.post(f"/dashboard/keys/{own.pk}/revoke").status_code == 302

    own.refresh_from_db()
    others.refresh_from_db()
    assert own.revoked_at is not None
    assert others.revoked_at is None


def test_revoking_needs_a_post(team):
    key, _ = api_key_create(organization=team.organization, name="k", created_by=team.alice)

    assert _client(team.alice).get(f"/dashboard/keys/{key.pk}/revoke").status_code == 405
    key.refresh_from_db()
    assert key.revoked_at is None


def test_revoking_checks_the_csrf_token(team):
    key, _ = api_key_create(organization=team.organization, name="k", created_by=team.alice)
    client = Client(enforce_csrf_checks=True)
    client.force_login(team.alice)

    assert client.post(f"/dashboard/keys/{key.pk}/revoke").status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None


def test_a_user_of_another_organisation_reaches_nothing_of_it(team):
    key, _ = api_key_create(organization=team.organization, name="acme-key", created_by=team.alice)
    client = _client(team.charlie)

    assert client.post(f"/dashboard/keys/{key.pk}/revoke").status_code == 404
    assert (
        client.post(f"/dashboard/keys/{key.pk}/revoke", {"org": team.organization.slug}).status_code
        == 404
    )
    assert client.get(f"/dashboard/?org={team.organization.slug}").status_code == 404
    assert (
        client.post(
            "/dashboard/keys/create", {"name": "intruder", "org": team.organization.slug}
        ).status_code
        == 404
    )
    page = client.get("/dashboard/")
    assert page.context["organization"] == team.other_organization
    assert key.prefix not in page.content.decode()
    assert "Acme" not in page.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is None
    assert not ApiKey.objects.filter(name="intruder").exists()


def test_it_switches_between_the_users_organisations_and_remembers_the_choice(team):
    Membership.objects.create(
        organization=team.other_organization, user=team.alice, role=Membership.Role.ADMIN
    )
    rival_key, _ = api_key_create(organization=team.other_organization, name="rival-key")
    client = _client(team.alice)

    assert client.get("/dashboard/").context["organization"] == team.organization
    switched = client.get(f"/dashboard/?org={team.other_organization.slug}")
    assert switched.context["organization"] == team.other_organization
    assert list(switched.context["api_keys"]) == [rival_key]  # an admin sees every key

    remembered = client.get("/dashboard/")
    assert remembered.context["organization"] == team.other_organization
    client.post("/dashboard/keys/create", {"name": "made-here"})
    assert ApiKey.objects.get(name="made-here").organization == team.other_organization
    assert client.get("/dashboard/?org=no-such-org").status_code == 404


def test_the_home_page_links_to_sign_up_log_in_and_the_dashboard(client, team):
    page = client.get("/").content.decode()
    assert 'href="/accounts/signup/"' in page
    assert 'href="/accounts/login/"' in page
    assert 'href="/dashboard/"' in page

    logged_in = _client(team.alice).get("/").content.decode()
    assert 'href="/dashboard/"' in logged_in
    assert "Log out" in logged_in


def test_a_user_without_an_organisation_is_told_so(client, team):
    operator = User.objects.create_user(email="ops@example.com", password="x" * 12)
    client.force_login(operator)

    response = client.get("/dashboard/")

    assert response.status_code == 200
    assert "No organisation yet" in response.content.decode()
    assert client.get("/dashboard/?org=someone-else").status_code == 404


def test_each_key_links_to_its_page_where_a_member_sees_but_cannot_set_limits(team):
    key, _ = api_key_create(organization=team.organization, name="mine", created_by=team.bob)
    client = _client(team.bob)

    dashboard = client.get("/dashboard/").content.decode()
    page = client.get(f"/dashboard/keys/{key.pk}/")

    assert f'href="/dashboard/keys/{key.pk}/?org={team.organization.slug}"' in dashboard
    assert page.status_code == 200
    assert page.context["can_manage"] and not page.context["can_edit_limits"]
    assert "Save limits" not in page.content.decode()
    assert "Rotate key" in page.content.decode()
