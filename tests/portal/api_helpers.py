"""The management API tests' cast: Alice owns Acme, Adam is an admin of it, Bob and Mallory are
plain members; Charlie owns Rival. The `team` fixture (tests/portal/conftest.py) builds it."""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework.test import APIClient

from portal.management_tokens import management_token_create
from portal.models import Membership, Organization, User
from tests.factories import make_org


@dataclass
class Team:
    acme: Organization
    alice: User
    adam: User
    bob: User
    mallory: User
    rival: Organization
    charlie: User


def _member(organization: Organization, email: str, role: str = Membership.Role.MEMBER) -> User:
    user = User.objects.create_user(email=email, password=None)
    Membership.objects.create(organization=organization, user=user, role=role)
    return user


def make_team() -> Team:
    acme = make_org(name="Acme", credit_usd="12.5")
    rival = make_org(name="Rival", credit_usd="99")
    return Team(
        acme=acme,
        alice=Membership.objects.get(organization=acme).user,
        adam=_member(acme, "adam@example.com", Membership.Role.ADMIN),
        bob=_member(acme, "bob@example.com"),
        mallory=_member(acme, "mallory@example.com"),
        rival=rival,
        charlie=Membership.objects.get(organization=rival).user,
    )


def as_user(user: User) -> APIClient:
    client = APIClient()
    client.force_login(user)
    return client


def as_token(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def token_for(user: User, organization: Organization, role: str) -> str:
    membership = Membership.objects.get(user=user, organization=organization)
    return management_token_create(membership=membership, name="script", role=role)[1]
