"""Invitations: sent by e-mail with a link; accepted or declined once, by the invited address,
before they expire."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from portal.models import Invitation, Membership, Organization, User
from tests.factories import make_org


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def acme(db) -> Organization:
    make_org(name="Rival", credit_usd=None)  # another organisation, never touched
    return make_org(name="Acme", credit_usd=None)


def _owner(organization: Organization) -> User:
    return Membership.objects.get(organization=organization, role=Membership.Role.OWNER).user


@pytest.fixture
def invite(mailoutbox, django_capture_on_commit_callbacks):
    """Invite through the page; returns the accept link's path from the e-mail (which leaves
    after the commit: tests run inside one transaction, so its callbacks are run here)."""

    def invite(acme: Organization, email: str, role: str = "admin") -> str:
        with django_capture_on_commit_callbacks(execute=True):
            response = _client(_owner(acme)).post(
                "/dashboard/org/invite", {"org": acme.slug, "email": email, "role": role}
            )
        return _link(response, mailoutbox, email)

    return invite


def _link(response, mailoutbox, email: str) -> str:
    assert response.status_code == 302
    message = mailoutbox[-1]
    assert message.to == [email.lower()]
    match = re.search(r"http://testserver(/invitations/\S+/)", message.body)
    assert match, message.body
    return match.group(1)


def test_the_invitee_accepts_and_joins_with_the_role(acme, invite):
    link = invite(acme, "Zoe@Example.com")
    zoe = User.objects.create_user(email="zoe@example.com", password=None)
    client = _client(zoe)

    page = client.get(link)
    response = client.post(link, {"answer": "accept"})

    assert page.status_code == 200
    assert "Accept" in page.content.decode()
    assert response.status_code == 302
    membership = Membership.objects.get(user=zoe)
    assert (membership.organization, membership.role) == (acme, Membership.Role.ADMIN)
    assert Invitation.objects.get(email="zoe@example.com").state == Invitation.State.ACCEPTED
    # The new organisation is the current one.
    assert client.get("/dashboard/").context["organization"] == acme


def test_only_the_hash_of_the_token_is_stored(acme, invite):
    link = invite(acme, "zoe@example.com")
    token = link.split("/")[2]

    assert not Invitation.objects.filter(hashed_token=token).exists()
    assert token not in str(list(Invitation.objects.values()))


def test_the_invitee_declines(acme, invite):
    link = invite(acme, "zoe@example.com")
    zoe = User.objects.create_user(email="zoe@example.com", password=None)

    response = _client(zoe).post(link, {"answer": "decline"})

    assert response.status_code == 302
    assert not Membership.objects.filter(user=zoe).exists()
    assert Invitation.objects.get().state == Invitation.State.DECLINED


def test_someone_logged_in_with_another_address_cannot_accept(acme, invite):
    link = invite(acme, "zoe@example.com")
    eve = User.objects.create_user(email="eve@example.com", password=None)
    client = _client(eve)

    page = client.get(link)
    response = client.post(link, {"answer": "accept"})

    assert "log in (or sign up) as zoe@example.com" in page.content.decode()
    assert response.status_code == 400
    assert "another e-mail address" in response.content.decode()
    assert not Membership.objects.filter(user=eve).exists()
    assert Invitation.objects.get().state == Invitation.State.PENDING


def test_an_expired_invitation_cannot_be_accepted(acme, invite):
    link = invite(acme, "zoe@example.com")
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    zoe = User.objects.create_user(email="zoe@example.com", password=None)

    response = _client(zoe).post(link, {"answer": "accept"})

    assert response.status_code == 400
    assert "expired" in response.content.decode()
    assert not Membership.objects.filter(user=zoe).exists()


def test_an_invitation_is_answered_only_once(acme, invite):
    link = invite(acme, "zoe@example.com")
    zoe = User.objects.create_user(email="zoe@example.com", password=None)
    client = _client(zoe)
    client.post(link, {"answer": "accept"})
    Membership.objects.filter(user=zoe).delete()  # removed since: the link must not re-admit

    again = client.post(link, {"answer": "accept"})
    decline = client.post(link, {"answer": "decline"})

    assert again.status_code == decline.status_code == 400
    assert "already accepted" in again.content.decode()
    assert not Membership.objects.filter(user=zoe).exists()
    assert Invitation.objects.get().state == Invitation.State.ACCEPTED


def test_a_withdrawn_invitation_and_a_made_up_token_do_not_work(acme, invite):
    link = invite(acme, "zoe@example.com")
    invitation = Invitation.objects.get()
    _client(_owner(acme)).post(
        f"/dashboard/org/invitations/{invitation.pk}/revoke", {"org": acme.slug}
    )
    zoe = User.objects.create_user(email="zoe@example.com", password=None)
    client = _client(zoe)

    assert client.post(link, {"answer": "accept"}).status_code == 400
    assert client.get("/invitations/made-up-token/").status_code == 404
    assert not Membership.objects.filter(user=zoe).exists()


def test_inviting_again_replaces_the_pending_invitation(acme, invite):
    first = invite(acme, "zoe@example.com")
    second = invite(acme, "zoe@example.com", role="member")
    zoe = User.objects.create_user(email="zoe@example.com", password=None)
    client = _client(zoe)

    assert client.post(first, {"answer": "accept"}).status_code == 400
    assert client.post(second, {"answer": "accept"}).status_code == 302
    assert Membership.objects.get(user=zoe).role == Membership.Role.MEMBER


def test_a_member_cannot_be_invited_again_nor_anyone_as_owner(acme, mailoutbox):
    owner = _owner(acme)
    client = _client(owner)

    client.post("/dashboard/org/invite", {"org": acme.slug, "email": owner.email, "role": "member"})
    client.post(
        "/dashboard/org/invite", {"org": acme.slug, "email": "x@example.com", "role": "owner"}
    )

    assert Invitation.objects.count() == 0
    assert mailoutbox == []


def test_answering_needs_a_login(acme, invite, client):
    link = invite(acme, "zoe@example.com")

    response = client.post(link, {"answer": "accept"})

    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")
    assert Invitation.objects.get().state == Invitation.State.PENDING
