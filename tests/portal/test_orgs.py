"""Organisations: create more, switch between them, transfer ownership, remove members, leave."""

from __future__ import annotations

import pytest
from django.db import IntegrityError, transaction
from django.test import Client

from portal.models import ApiKey, Membership, Organization, User
from portal.services import (
    OrganizationError,
    api_key_create,
    organization_create,
    ownership_transfer,
)
from tests.factories import make_org


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _owner(organization: Organization) -> User:
    return Membership.objects.get(organization=organization, role=Membership.Role.OWNER).user


def _join(organization: Organization, email: str, role: str = "member") -> Membership:
    user = User.objects.filter(email=email).first() or User.objects.create_user(
        email=email, password=None
    )
    return Membership.objects.create(organization=organization, user=user, role=role)


@pytest.fixture
def acme(db) -> Organization:
    make_org(name="Rival", credit_usd=None)
    return make_org(name="Acme", credit_usd=None)


def test_a_user_creates_another_organisation_and_owns_it(acme):
    alice = _owner(acme)
    client = _client(alice)

    response = client.post("/dashboard/orgs/", {"name": "Side project"})

    assert response.status_code == 302
    created = Organization.objects.get(name="Side project")
    assert Membership.objects.get(organization=created).user == alice
    assert Membership.objects.get(organization=created).role == Membership.Role.OWNER
    assert client.get("/dashboard/").context["organization"] == created  # now current
    assert [m.organization for m in client.get("/dashboard/orgs/").context["memberships"]] == [
        acme,
        created,
    ]


def test_an_organisation_needs_a_name(acme):
    response = _client(_owner(acme)).post("/dashboard/orgs/", {"name": "  "})

    assert response.status_code == 200
    assert Organization.objects.count() == 2


def test_an_operator_made_organisations_name_is_cut_to_the_column_as_a_users_is(acme):
    organization = organization_create(name="n" * 250, owner_email="ops@example.com")

    organization.refresh_from_db()
    assert organization.name == "n" * 200


def test_the_header_switcher_changes_the_current_organisation_for_every_page(acme):
    alice = _owner(acme)
    other = make_org(name="Beta", credit_usd=None)
    _join(other, alice.email)
    client = _client(alice)
    page = client.get("/dashboard/").content.decode()
    assert 'action="/dashboard/orgs/switch"' in page
    assert f'value="{other.slug}"' in page

    response = client.post(
        "/dashboard/orgs/switch", {"org": other.slug, "next": "/dashboard/org/?org=" + acme.slug}
    )

    assert response.status_code == 302
    assert response["Location"] == "/dashboard/org/"
    assert client.get("/dashboard/").context["organization"] == other
    assert client.get("/dashboard/org/").context["organization"] == other
    switched_page = client.get("/dashboard/").content.decode()
    assert f'<option value="{other.slug}" selected>' in switched_page


def test_switching_to_an_organisation_of_others_is_a_404_and_changes_nothing(acme):
    alice = _owner(acme)
    rival = Organization.objects.get(name="Rival")
    client = _client(alice)

    assert client.post("/dashboard/orgs/switch", {"org": rival.slug}).status_code == 404
    assert client.post("/dashboard/orgs/switch", {"org": "no-such"}).status_code == 404
    assert client.get("/dashboard/").context["organization"] == acme


def test_switching_refuses_to_redirect_off_site(acme):
    response = _client(_owner(acme)).post(
        "/dashboard/orgs/switch", {"org": acme.slug, "next": "https://evil.example/"}
    )

    assert response["Location"] == "/dashboard/"


def test_transferring_ownership_keeps_exactly_one_owner(acme):
    alice = _owner(acme)
    bob = _join(acme, "bob@example.com")

    response = _client(alice).post(f"/dashboard/org/members/{bob.pk}/transfer", {"org": acme.slug})

    assert response.status_code == 302
    roles = dict(Membership.objects.filter(organization=acme).values_list("user__email", "role"))
    assert roles == {alice.email: "admin", "bob@example.com": "owner"}
    # The previous owner, now an admin, may no longer transfer or remove members.
    assert (
        _client(alice)
        .post(f"/dashboard/org/members/{bob.pk}/transfer", {"org": acme.slug})
        .status_code
        == 403
    )


def test_ownership_cannot_go_to_someone_outside_the_organisation(acme):
    rival_owner = Membership.objects.get(organization__name="Rival")

    with pytest.raises(OrganizationError):
        ownership_transfer(organization=acme, to_membership=rival_owner)
    response = _client(_owner(acme)).post(
        f"/dashboard/org/members/{rival_owner.pk}/transfer", {"org": acme.slug}
    )

    assert response.status_code == 404
    assert Membership.objects.filter(organization=acme, role="owner").count() == 1
    rival_owner.refresh_from_db()
    assert rival_owner.role == Membership.Role.OWNER


def test_the_database_refuses_a_second_owner(acme):
    with pytest.raises(IntegrityError), transaction.atomic():
        _join(acme, "second@example.com", role=Membership.Role.OWNER)


def test_removing_a_member_keeps_their_keys_which_belong_to_the_organisation(acme):
    bob = _join(acme, "bob@example.com")
    key, _ = api_key_create(organization=acme, name="bob's", created_by=bob.user)

    response = _client(_owner(acme)).post(
        f"/dashboard/org/members/{bob.pk}/remove", {"org": acme.slug}
    )

    assert response.status_code == 302
    assert not Membership.objects.filter(pk=bob.pk).exists()
    key.refresh_from_db()
    assert key.revoked_at is None
    assert key.organization == acme
    # Bob no longer reaches the organisation or its keys.
    assert (
        _client(bob.user).get(f"/dashboard/keys/{key.pk}/", {"org": acme.slug}).status_code == 404
    )


def test_removing_a_member_can_revoke_their_keys_and_only_theirs(acme):
    bob = _join(acme, "bob@example.com")
    bobs, _ = api_key_create(organization=acme, name="bob's", created_by=bob.user)
    owners, _ = api_key_create(organization=acme, name="owner's", created_by=_owner(acme))

    _client(_owner(acme)).post(
        f"/dashboard/org/members/{bob.pk}/remove", {"org": acme.slug, "revoke_keys": "on"}
    )

    assert ApiKey.objects.get(pk=bobs.pk).revoked_at is not None
    assert ApiKey.objects.get(pk=owners.pk).revoked_at is None


def test_a_member_leaves_and_the_owner_cannot(acme):
    bob = _join(acme, "bob@example.com")
    alice = _owner(acme)

    left = _client(bob.user).post("/dashboard/org/leave", {"org": acme.slug})
    stayed = _client(alice).post("/dashboard/org/leave", {"org": acme.slug}, follow=True)

    assert left.status_code == 302
    assert not Membership.objects.filter(pk=bob.pk).exists()
    assert "transfer ownership" in stayed.content.decode()
    assert Membership.objects.filter(organization=acme, user=alice, role="owner").exists()


def test_the_members_page_lists_the_organisation_and_nobody_else(acme):
    _join(acme, "bob@example.com")

    page = _client(_owner(acme)).get("/dashboard/org/").content.decode()

    assert "bob@example.com" in page
    assert _owner(Organization.objects.get(name="Rival")).email not in page
