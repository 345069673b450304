"""The dashboard's management token page, by role."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from portal.management_tokens import hash_token
from portal.models import ManagementToken, User


def browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_an_owner_creates_a_token_shown_once_that_calls_the_api(team):
    client = browser(team.alice)

    response = client.post(
        "/dashboard/tokens", {"org": team.acme.slug, "name": "deploy", "role": "admin"}
    )

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    secret = response.context["secret"]
    token = ManagementToken.objects.get()
    assert (token.name, token.role, token.created_by) == ("deploy", "admin", team.alice)
    listing = client.get("/dashboard/tokens", {"org": team.acme.slug})
    assert token.prefix in listing.content.decode() and secret not in listing.content.decode()
    script = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert script.get(f"/api/v1/organizations/{team.acme.slug}/keys/").status_code == 200


def test_a_name_longer_than_the_column_is_cut_to_it_as_a_rename_is(team):
    response = browser(team.alice).post(
        "/dashboard/tokens", {"org": team.acme.slug, "name": "n" * 150, "role": "member"}
    )

    assert response.status_code == 200
    assert ManagementToken.objects.get().name == "n" * 100


def test_an_admin_cannot_make_an_owner_token(team):
    response = browser(team.adam).post(
        "/dashboard/tokens", {"org": team.acme.slug, "name": "x", "role": "owner"}, follow=True
    )

    assert "above its creator" in response.content.decode()
    assert not ManagementToken.objects.exists()


@pytest.mark.parametrize("method", ["get", "post"])
def test_a_member_may_not_manage_tokens(team, method):
    response = getattr(browser(team.bob), method)(
        "/dashboard/tokens", {"org": team.acme.slug, "name": "x"}
    )

    assert response.status_code == 403
    assert not ManagementToken.objects.exists()


def test_revoking_from_the_page_stops_the_token(team):
    client = browser(team.alice)
    secret = client.post(
        "/dashboard/tokens", {"org": team.acme.slug, "name": "t", "role": "member"}
    ).context["secret"]
    token = ManagementToken.objects.get()

    response = client.post(f"/dashboard/tokens/{token.pk}/revoke", {"org": team.acme.slug})

    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None
    script = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert script.get("/api/v1/organizations/").status_code == 401


def test_an_operator_creates_a_token_in_the_admin_shown_once(team):
    operator = User.objects.create_superuser(email="ops@example.com", password="x")
    client = browser(operator)

    response = client.post(
        "/admin/portal/managementtoken/add/",
        {
            "organization": team.acme.pk,
            "created_by": team.adam.pk,
            "name": "ops-made",
            "role": "admin",
        },
        follow=True,
    )

    assert response.status_code == 200
    token = ManagementToken.objects.get()
    assert (token.name, token.role, token.created_by) == ("ops-made", "admin", team.adam)
    shown = re.search(r"sbm_[0-9A-Za-z]{40}", response.content.decode())
    assert shown, "the secret is in the message"
    secret = shown.group(0)
    assert token.hashed_token == hash_token(secret)
    assert (
        secret
        not in client.get(f"/admin/portal/managementtoken/{token.pk}/change/").content.decode()
    )


@pytest.mark.parametrize(
    ("creator", "role"), [("bob", "member"), ("adam", "owner"), ("charlie", "member")]
)
def test_the_admin_refuses_a_token_its_creator_could_not_make(team, creator, role):
    operator = User.objects.create_superuser(email="ops@example.com", password="x")

    response = browser(operator).post(
        "/admin/portal/managementtoken/add/",
        {
            "organization": team.acme.pk,
            "created_by": getattr(team, creator).pk,
            "name": "x",
            "role": role,
        },
    )

    assert response.status_code == 200  # the form again, with the reason
    assert response.context["adminform"].form.errors
    assert not ManagementToken.objects.exists()
