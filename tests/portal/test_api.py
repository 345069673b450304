"""The management API (/api/v1/): organisations, members, keys, tokens, and who may do what.

Alice owns Acme, Adam is an admin of it, Bob and Mallory are plain members; Charlie owns Rival.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from drf_spectacular.validation import validate_schema
from rest_framework.test import APIClient

from portal import api_keys
from portal.models import ApiKey, ManagementToken, Membership, Organization, User
from portal.services import api_key_create
from tests.portal.api_helpers import as_token, as_user, token_for


def keys_url(org: Organization) -> str:
    return f"/api/v1/organizations/{org.slug}/keys/"


# Organisations and members


def test_it_refuses_anonymous_callers_with_401(client, team):
    for url in ("/api/v1/organizations/", keys_url(team.acme)):
        response = client.get(url)
        assert response.status_code == 401
        assert response["WWW-Authenticate"] == "Bearer"


def test_it_lists_only_the_callers_organisations(team):
    response = as_user(team.bob).get("/api/v1/organizations/")

    assert response.status_code == 200
    assert response.json() == [
        {
            "slug": team.acme.slug,
            "name": "Acme",
            "created_at": response.json()[0]["created_at"],
            "role": "member",
        }
    ]


def test_a_signed_in_user_creates_an_organisation_and_owns_it(team):
    response = as_user(team.bob).post("/api/v1/organizations/", {"name": "Bob's lab"})

    assert response.status_code == 201
    assert (response.json()["name"], response.json()["role"]) == ("Bob's lab", "owner")
    created = Organization.objects.get(slug=response.json()["slug"])
    assert Membership.objects.get(organization=created).user == team.bob
    assert Membership.objects.get(user=team.bob, organization=team.acme).role == "member"


def test_a_management_token_cannot_create_organisations(team):
    secret = token_for(team.alice, team.acme, "owner")

    response = as_token(secret).post("/api/v1/organizations/", {"name": "Shadow"})

    assert response.status_code == 403
    assert not Organization.objects.filter(name="Shadow").exists()


def test_another_organisation_is_a_404_whether_or_not_it_exists(team):
    client = as_user(team.charlie)
    for slug in (team.acme.slug, "no-such-org"):
        assert client.get(f"/api/v1/organizations/{slug}/").status_code == 404
        assert client.get(f"/api/v1/organizations/{slug}/members/").status_code == 404


def test_members_are_listed_with_their_roles(team):
    response = as_user(team.bob).get(f"/api/v1/organizations/{team.acme.slug}/members/")

    assert response.status_code == 200
    assert {(m["email"], m["role"]) for m in response.json()} == {
        (team.alice.email, "owner"),
        ("adam@example.com", "admin"),
        ("bob@example.com", "member"),
        ("mallory@example.com", "member"),
    }


# API keys


def test_creating_a_key_returns_its_secret_once(team):
    client = as_user(team.bob)

    response = client.post(keys_url(team.acme), {"name": "backend"}, format="json")

    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    secret = response.json()["key"]
    key = ApiKey.objects.get(pk=response.json()["id"])
    assert key.hashed_key == api_keys.hash_key(secret)
    assert key.created_by == team.bob and key.organization == team.acme
    listed = client.get(keys_url(team.acme))
    assert secret not in listed.content.decode()
    assert [k["name"] for k in listed.json()] == ["backend"]


def test_a_key_needs_a_name(team):
    response = as_user(team.bob).post(keys_url(team.acme), {"name": "  "}, format="json")

    assert response.status_code == 400
    assert "name" in response.json()
    assert not ApiKey.objects.exists()


def test_members_see_their_own_keys_and_admins_and_owners_every_key(team):
    by_bob, _ = api_key_create(organization=team.acme, name="bob-key", created_by=team.bob)
    by_mallory, _ = api_key_create(organization=team.acme, name="m-key", created_by=team.mallory)
    api_key_create(organization=team.rival, name="rival-key", created_by=team.charlie)

    def names(user: User) -> set[str]:
        return {k["name"] for k in as_user(user).get(keys_url(team.acme)).json()}

    assert names(team.bob) == {"bob-key"}
    assert names(team.mallory) == {"m-key"}
    assert names(team.adam) == {"bob-key", "m-key"}
    assert names(team.alice) == {"bob-key", "m-key"}
    assert as_user(team.bob).get(f"{keys_url(team.acme)}{by_mallory.pk}/").status_code == 404
    assert as_user(team.adam).get(f"{keys_url(team.acme)}{by_bob.pk}/").status_code == 200


@pytest.mark.parametrize(
    ("who", "own", "expected"),
    [
        # Limits are for admins and owners, even on a member's own key (as on the key's page).
        ("bob", True, 403),
        ("bob", False, 404),
        ("adam", False, 200),
        ("alice", False, 200),
        ("charlie", False, 404),
    ],
)
def test_updating_limits_by_role(team, who, own, expected):
    creator = team.bob if own else team.mallory
    key, _ = api_key_create(organization=team.acme, name="k", created_by=creator)
    caller = getattr(team, who)

    response = as_user(caller).patch(
        f"{keys_url(team.acme)}{key.pk}/",
        {"requests_per_minute": 60, "allowed_models": ["fake-small"], "name": "renamed"},
        format="json",
    )

    assert response.status_code == expected
    key.refresh_from_db()
    if expected == 200:
        assert (key.requests_per_minute, key.allowed_models, key.name) == (
            60,
            ["fake-small"],
            "renamed",
        )
        assert response.json()["requests_per_minute"] == 60
    else:
        assert (key.requests_per_minute, key.allowed_models, key.name) == (None, [], "k")


def test_a_patch_changes_only_the_fields_sent_and_null_means_unlimited(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    client = as_user(team.adam)
    client.patch(f"{keys_url(team.acme)}{key.pk}/", {"tokens_per_minute": 1000}, format="json")
    client.patch(f"{keys_url(team.acme)}{key.pk}/", {"max_concurrent_requests": 2}, format="json")
    key.refresh_from_db()
    assert (key.tokens_per_minute, key.max_concurrent_requests) == (1000, 2)

    response = client.patch(
        f"{keys_url(team.acme)}{key.pk}/", {"tokens_per_minute": None}, format="json"
    )

    assert response.status_code == 200
    key.refresh_from_db()
    assert (key.tokens_per_minute, key.max_concurrent_requests) == (None, 2)


def test_bad_limits_are_refused(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)

    response = as_user(team.bob).patch(
        f"{keys_url(team.acme)}{key.pk}/", {"requests_per_minute": 0}, format="json"
    )

    assert response.status_code == 400
    assert "requests_per_minute" in response.json()
    key.refresh_from_db()
    assert key.requests_per_minute is None


@pytest.mark.parametrize(
    ("who", "own", "expected"),
    [("bob", True, 200), ("bob", False, 404), ("adam", False, 200), ("charlie", False, 404)],
)
def test_revoking_by_role(team, who, own, expected):
    key, _ = api_key_create(
        organization=team.acme, name="k", created_by=team.bob if own else team.mallory
    )

    response = as_user(getattr(team, who)).post(f"{keys_url(team.acme)}{key.pk}/revoke/")

    assert response.status_code == expected
    key.refresh_from_db()
    assert (key.revoked_at is not None) == (expected == 200)


def test_a_member_renames_their_own_key(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)

    response = as_user(team.bob).patch(
        f"{keys_url(team.acme)}{key.pk}/", {"name": "renamed"}, format="json"
    )

    assert response.status_code == 200
    key.refresh_from_db()
    assert key.name == "renamed"


def test_an_admin_sets_the_ip_allowlist_in_canonical_form(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)

    response = as_user(team.adam).patch(
        f"{keys_url(team.acme)}{key.pk}/", {"ip_allowlist": ["10.0.0.7"]}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["ip_allowlist"] == ["10.0.0.7/32"]
    key.refresh_from_db()
    assert key.ip_allowlist == ["10.0.0.7/32"]


def test_a_bad_network_in_the_allowlist_is_a_400_and_changes_nothing(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)

    response = as_user(team.adam).patch(
        f"{keys_url(team.acme)}{key.pk}/",
        {"ip_allowlist": ["10.0.0.0/8", "not-an-ip"], "name": "x"},
        format="json",
    )

    assert response.status_code == 400
    key.refresh_from_db()
    assert (key.ip_allowlist, key.name) == ([], "k")


def test_a_limit_too_large_for_its_column_is_a_400_and_changes_nothing(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)

    response = as_user(team.adam).patch(
        f"{keys_url(team.acme)}{key.pk}/", {"requests_per_minute": 10**20}, format="json"
    )

    assert response.status_code == 400
    key.refresh_from_db()
    assert key.requests_per_minute is None


def test_rotating_with_an_overlap_beyond_the_maximum_is_a_400(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)

    response = as_user(team.bob).post(
        f"{keys_url(team.acme)}{key.pk}/rotate/", {"overlap_hours": 10**13}, format="json"
    )

    assert response.status_code == 400
    assert "overlap_hours" in response.json()
    assert not ApiKey.objects.filter(rotated_from=key).exists()


def test_rotating_returns_a_new_secret_once_and_the_old_key_expires_after_the_overlap(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    before = timezone.now()

    response = as_user(team.bob).post(
        f"{keys_url(team.acme)}{key.pk}/rotate/", {"overlap_hours": 2}, format="json"
    )

    assert response.status_code == 201
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    new_key = ApiKey.objects.get(pk=body["id"])
    assert new_key.hashed_key == api_keys.hash_key(body["key"])
    assert (new_key.name, body["rotated_from"]) == ("k", key.pk)
    key.refresh_from_db()
    assert key.expires_at is not None
    assert before + timedelta(hours=2) <= key.expires_at <= timezone.now() + timedelta(hours=2)
    listed = as_user(team.bob).get(f"{keys_url(team.acme)}{new_key.pk}/").json()
    assert "key" not in listed


def test_a_revoked_key_cannot_be_changed(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    client = as_user(team.bob)
    client.post(f"{keys_url(team.acme)}{key.pk}/revoke/")

    response = client.patch(f"{keys_url(team.acme)}{key.pk}/", {"name": "x"}, format="json")

    assert response.status_code == 400
    key.refresh_from_db()
    assert key.name == "k"


def test_session_writes_need_the_csrf_token(team):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(team.bob)

    response = client.post(keys_url(team.acme), {"name": "x"}, format="json")

    assert response.status_code == 403
    assert not ApiKey.objects.exists()


# Management tokens


def test_an_owner_creates_a_token_that_authenticates_scripts(team):
    response = as_user(team.alice).post(
        f"/api/v1/organizations/{team.acme.slug}/tokens/",
        {"name": "ci", "role": "admin"},
        format="json",
    )

    assert response.status_code == 201
    secret = response.json()["token"]
    assert secret.startswith("sbm_")
    token = ManagementToken.objects.get()
    assert token.hashed_token != secret and token.role == "admin"
    script = as_token(secret)
    assert script.get("/api/v1/organizations/").json()[0]["slug"] == team.acme.slug
    created = script.post(keys_url(team.acme), {"name": "from-ci"}, format="json")
    assert created.status_code == 201
    assert ApiKey.objects.get(name="from-ci").created_by == team.alice
    token.refresh_from_db()
    assert token.last_used_at is not None


def test_a_token_is_scoped_to_its_organisation(team):
    # Charlie is also an admin of Acme, but his Rival token must not reach it.
    Membership.objects.create(organization=team.acme, user=team.charlie, role="admin")
    secret = token_for(team.charlie, team.rival, "owner")
    api_key_create(organization=team.acme, name="acme-key", created_by=team.alice)

    script = as_token(secret)

    assert [o["slug"] for o in script.get("/api/v1/organizations/").json()] == [team.rival.slug]
    assert script.get(keys_url(team.acme)).status_code == 404
    assert script.post(keys_url(team.acme), {"name": "x"}, format="json").status_code == 404
    assert not ApiKey.objects.filter(name="x").exists()


def test_a_member_token_sees_only_its_creators_keys(team):
    api_key_create(organization=team.acme, name="bob-key", created_by=team.bob)
    api_key_create(organization=team.acme, name="alice-key", created_by=team.alice)
    secret = token_for(team.alice, team.acme, "member")

    names = {k["name"] for k in as_token(secret).get(keys_url(team.acme)).json()}

    assert names == {"alice-key"}


def test_a_tokens_role_never_exceeds_its_creators_current_role(team):
    secret = token_for(team.adam, team.acme, "admin")
    api_key_create(organization=team.acme, name="bob-key", created_by=team.bob)
    assert len(as_token(secret).get(keys_url(team.acme)).json()) == 1

    Membership.objects.filter(user=team.adam).update(role="member")

    assert as_token(secret).get(keys_url(team.acme)).json() == []


def test_a_token_stops_when_its_creator_leaves_or_it_is_revoked(team):
    adams = token_for(team.adam, team.acme, "admin")
    alices = token_for(team.alice, team.acme, "owner")
    Membership.objects.filter(user=team.adam).delete()
    assert as_token(adams).get("/api/v1/organizations/").status_code == 401

    token = ManagementToken.objects.get(created_by=team.alice)
    response = as_user(team.alice).post(
        f"/api/v1/organizations/{team.acme.slug}/tokens/{token.pk}/revoke/"
    )

    assert response.status_code == 200
    assert as_token(alices).get("/api/v1/organizations/").status_code == 401
    assert as_token("sbm_made-up").get("/api/v1/organizations/").status_code == 401


@pytest.mark.parametrize(
    ("who", "role", "expected"),
    [
        ("bob", "member", 403),
        ("adam", "admin", 201),
        ("adam", "owner", 400),
        ("alice", "owner", 201),
        ("charlie", "member", 404),
    ],
)
def test_creating_tokens_by_role(team, who, role, expected):
    response = as_user(getattr(team, who)).post(
        f"/api/v1/organizations/{team.acme.slug}/tokens/",
        {"name": "t", "role": role},
        format="json",
    )

    assert response.status_code == expected
    assert ManagementToken.objects.exists() == (expected == 201)


def test_a_token_cannot_manage_tokens(team):
    secret = token_for(team.alice, team.acme, "owner")

    response = as_token(secret).post(
        f"/api/v1/organizations/{team.acme.slug}/tokens/", {"name": "t2"}, format="json"
    )

    assert response.status_code == 403
    assert ManagementToken.objects.count() == 1


def test_an_api_key_is_not_a_management_token(team):
    _, secret = api_key_create(organization=team.acme, name="k", created_by=team.alice)

    assert as_token(secret).get("/api/v1/organizations/").status_code == 401


# Schema and docs


def test_the_openapi_schema_is_served_and_valid(team):
    response = as_user(team.bob).get("/api/v1/schema/", {"format": "json"})

    assert response.status_code == 200
    schema = response.json()
    validate_schema(schema)  # drf-spectacular's check against the OpenAPI 3 JSON schema
    assert "/api/v1/organizations/{organization}/keys/" in schema["paths"]
    assert "/api/v1/key" in schema["paths"]
    # Every management route is described (drf-spectacular builds it from the URLconf).
    for path in (
        "members/{member_id}/",
        "members/{member_id}/transfer-ownership/",
        "invitations/",
        "invitations/{invitation_id}/revoke/",
        "keys/{key_id}/rotate/",
        "keys/{key_id}/spend-cap/",
        "statements/",
        "statements/{statement_id}/",
        "statements/{statement_id}/csv/",
        "statements/{statement_id}/pdf/",
    ):
        assert f"/api/v1/organizations/{{organization}}/{path}" in schema["paths"], path
    assert {"managementToken", "apiKey", "cookieAuth"} <= set(
        schema["components"]["securitySchemes"]
    )


def test_the_docs_page_serves_its_assets_from_the_app(client):
    response = client.get("/api/v1/docs/")  # no login needed: it holds no one's data

    assert response.status_code == 200
    page = response.content.decode()
    assert "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower()


def test_an_unknown_api_path_is_a_json_404(client, team):
    for response in (
        client.get("/api/v1/nothing-here"),
        as_user(team.bob).post("/api/v1/organizations/x/nothing/"),
        client.get("/api/v2/organizations/"),
    ):
        assert response.status_code == 404
        assert response.json() == {"detail": "No such endpoint."}
