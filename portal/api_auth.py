"""Who is calling the management API, and as which member of which organisation.

Two ways in: the dashboard's session (a user, who names the organisation in the URL), and a
management token (`Authorization: Bearer sbm_…`, one organisation, a capped role). Every view
turns the URL's organisation into the caller's membership with `caller_membership`; an
organisation the caller does not belong to is a 404, whether or not it exists (views under an
organisation get it from portal/api_base.py's `OrganizationScoped`).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed, NotFound
from rest_framework.request import Request

from portal.management_tokens import TOKEN_PREFIX, management_token_membership
from portal.models import ManagementToken, Membership, User
from portal.selectors import OrganizationNotFound, membership_get, memberships_of_user


class TokenAuth:
    """What `ManagementTokenAuthentication` leaves in `request.auth`."""

    def __init__(self, token: ManagementToken, membership: Membership) -> None:
        self.token = token
        self.membership = membership


class ManagementTokenAuthentication(BaseAuthentication):
    """`Authorization: Bearer sbm_…`. Other bearer tokens (an `sb_` API key) are not ours."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[User, TokenAuth] | None:
        scheme, _, secret = get_authorization_header(request).decode("latin-1").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret.startswith(TOKEN_PREFIX):
            return None
        found = management_token_membership(secret=secret)
        if found is None:
            raise AuthenticationFailed("Invalid or revoked management token.")
        token, membership = found
        return token.created_by, TokenAuth(token, membership)

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


def caller_user(request: Request) -> User:
    """The signed-in user (or the token's creator); NotFound for anyone else."""
    user = request.user
    if not isinstance(user, User):
        raise NotFound()
    return user


def caller_memberships(request: Request) -> list[Membership]:
    """Every membership the caller may act through: the token's one, or the user's."""
    if isinstance(request.auth, TokenAuth):
        return [request.auth.membership]
    return list(memberships_of_user(user=caller_user(request)))


def caller_membership(request: Request, organization_slug: str) -> Membership:
    """The caller's membership of the organisation with this slug; NotFound (404) otherwise."""
    if isinstance(request.auth, TokenAuth):
        membership = request.auth.membership
        if membership.organization.slug != organization_slug:
            raise NotFound("No such organisation.")
        return membership
    try:
        return membership_get(user=caller_user(request), organization_slug=organization_slug)
    except OrganizationNotFound:
        raise NotFound("No such organisation.") from None


def is_token_call(request: Request) -> bool:
    return isinstance(request.auth, TokenAuth)


class ManagementTokenScheme(OpenApiAuthenticationExtension):
    """Describes management tokens in the OpenAPI schema."""

    target_class = "portal.api_auth.ManagementTokenAuthentication"
    name = "managementToken"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An organisation's management token, `sbm_…`.",
        }
