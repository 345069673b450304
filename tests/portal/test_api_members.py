"""The management API's members, invitations and ownership transfer.

Alice owns Acme, Adam is an admin of it, Bob and Mallory are plain members; Charlie owns Rival.
"""

from __future__ import annotations

from django.core import mail

from portal.models import ApiKey, Invitation, Membership, Organization, User
from portal.services import api_key_create, invitation_create
from tests.portal.api_helpers import Team, as_token, as_user, token_for


def org_url(org: Organization, tail: str) -> str:
    return f"/api/v1/organizations/{org.slug}/{tail}"


def membership_of(user: User, org: Organization) -> Membership:
    return Membership.objects.get(user=user, organization=org)


def invite(team: Team, email: str = "dave@example.com") -> Invitation:
    return invitation_create(
        organization=team.acme,
        email=email,
        role=Membership.Role.MEMBER,
        invited_by=team.alice,
        site_url="http://testserver/",
    )[0]


def test_members_carry_the_id_the_member_endpoints_take(team):
    bob = membership_of(team.bob, team.acme)

    listed = as_user(team.bob).get(org_url(team.acme, "members/")).json()
    one = as_user(team.bob).get(org_url(team.acme, f"members/{bob.pk}/"))

    assert {m["email"]: m["id"] for m in listed}["bob@example.com"] == bob.pk
    assert one.json()["role"] == "member"


def test_the_owner_makes_a_member_an_admin(team):
    bob = membership_of(team.bob, team.acme)

    response = as_user(team.alice).patch(
        org_url(team.acme, f"members/{bob.pk}/"), {"role": "admin"}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["role"] == "admin"
    bob.refresh_from_db()
    assert bob.role == Membership.Role.ADMIN


def test_no_one_is_made_owner_by_a_role_change(team):
    bob = membership_of(team.bob, team.acme)

    response = as_user(team.alice).patch(
        org_url(team.acme, f"members/{bob.pk}/"), {"role": "owner"}, format="json"
    )

    assert response.status_code == 400
    bob.refresh_from_db()
    assert bob.role == Membership.Role.MEMBER


def test_the_owners_own_membership_cannot_be_removed(team):
    alice = membership_of(team.alice, team.acme)

    response = as_user(team.alice).delete(org_url(team.acme, f"members/{alice.pk}/"))

    assert response.status_code == 403
    assert Membership.objects.filter(pk=alice.pk).exists()


def test_removing_a_member_keeps_their_keys_unless_asked(team):
    bobs_key, _ = api_key_create(organization=team.acme, name="b", created_by=team.bob)
    mallorys_key, _ = api_key_create(organization=team.acme, name="m", created_by=team.mallory)
    client = as_user(team.alice)

    kept = client.delete(org_url(team.acme, f"members/{membership_of(team.bob, team.acme).pk}/"))
    revoked = client.delete(
        org_url(team.acme, f"members/{membership_of(team.mallory, team.acme).pk}/")
        + "?revoke_keys=true"
    )

    assert (kept.status_code, revoked.status_code) == (204, 204)
    assert not Membership.objects.filter(user__in=[team.bob, team.mallory]).exists()
    assert ApiKey.objects.get(pk=bobs_key.pk).revoked_at is None
    assert ApiKey.objects.get(pk=mallorys_key.pk).revoked_at is not None


def test_transferring_ownership_leaves_one_owner_and_the_old_one_admin(team):
    bob = membership_of(team.bob, team.acme)

    response = as_user(team.alice).post(org_url(team.acme, f"members/{bob.pk}/transfer-ownership/"))

    assert response.status_code == 200
    roles = {m["email"]: m["role"] for m in response.json()}
    assert roles["bob@example.com"] == "owner"
    assert roles[team.alice.email] == "admin"
    assert Membership.objects.filter(organization=team.acme, role="owner").count() == 1
    assert membership_of(team.charlie, team.rival).role == Membership.Role.OWNER


def test_an_owner_token_transfers_ownership_too(team):
    secret = token_for(team.alice, team.acme, "owner")
    bob = membership_of(team.bob, team.acme)

    response = as_token(secret).post(org_url(team.acme, f"members/{bob.pk}/transfer-ownership/"))

    assert response.status_code == 200
    bob.refresh_from_db()
    assert bob.role == Membership.Role.OWNER


def test_inviting_sends_the_link_by_mail_and_lists_the_invitation(
    team, django_capture_on_commit_callbacks
):
    client = as_user(team.alice)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            org_url(team.acme, "invitations/"),
            {"email": "Dave@Example.com", "role": "admin"},
            format="json",
        )

    assert response.status_code == 201
    body = response.json()
    assert (body["email"], body["role"], body["state"]) == ("dave@example.com", "admin", "pending")
    assert "token" not in body and "hashed_token" not in body
    assert [m.to for m in mail.outbox] == [["dave@example.com"]]
    assert "/invitations/" in mail.outbox[0].body
    listed = client.get(org_url(team.acme, "invitations/")).json()
    assert [i["id"] for i in listed] == [body["id"]]


def test_inviting_a_member_again_is_a_400(team):
    response = as_user(team.alice).post(
        org_url(team.acme, "invitations/"), {"email": "bob@example.com"}, format="json"
    )

    assert response.status_code == 400
    assert not Invitation.objects.exists()


def test_an_address_longer_than_an_e_mail_column_is_a_400(team):
    # 250 + "@b.test": valid to the e-mail validator, longer than the 254 the columns hold.
    too_long = "a" * 250 + "@b.test"

    response = as_user(team.alice).post(
        org_url(team.acme, "invitations/"), {"email": too_long}, format="json"
    )

    assert response.status_code == 400
    assert "254" in response.json()["detail"]
    assert not Invitation.objects.exists()


def test_withdrawing_an_invitation_stops_its_link(team):
    invitation = invite(team)

    response = as_user(team.alice).post(org_url(team.acme, f"invitations/{invitation.pk}/revoke/"))

    assert response.status_code == 200
    assert response.json()["state"] == "revoked"
    invitation.refresh_from_db()
    assert invitation.state == Invitation.State.REVOKED
    assert as_user(team.alice).get(org_url(team.acme, "invitations/")).json() == []


def test_a_member_cannot_tell_which_invitation_ids_exist(team):
    invitation = invite(team)
    missing = invitation.pk + 1000

    existing = as_user(team.bob).post(org_url(team.acme, f"invitations/{invitation.pk}/revoke/"))
    absent = as_user(team.bob).post(org_url(team.acme, f"invitations/{missing}/revoke/"))

    # Refused for the role before any lookup: the same answer whether the id exists or not.
    assert (existing.status_code, absent.status_code) == (403, 403)
    assert existing.json() == absent.json()
    invitation.refresh_from_db()
    assert invitation.state == Invitation.State.PENDING


def test_another_organisations_invitations_are_not_listed(team):
    invitation_create(
        organization=team.rival,
        email="eve@example.com",
        role=Membership.Role.MEMBER,
        invited_by=team.charlie,
        site_url="http://testserver/",
    )
    invite(team)

    listed = as_user(team.alice).get(org_url(team.acme, "invitations/")).json()

    assert [i["email"] for i in listed] == ["dave@example.com"]


def test_a_token_acts_with_its_own_role_not_its_creators(team):
    members_token = token_for(team.alice, team.acme, "member")
    owners_token = token_for(team.alice, team.acme, "owner")
    body = {"email": "dave@example.com"}

    refused = as_token(members_token).post(org_url(team.acme, "invitations/"), body, format="json")
    allowed = as_token(owners_token).post(org_url(team.acme, "invitations/"), body, format="json")

    assert (refused.status_code, allowed.status_code) == (403, 201)
    assert Invitation.objects.filter(email="dave@example.com").count() == 1
