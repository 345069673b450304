"""Management tokens: the secrets scripts use to call the management API (`/api/v1/`).

A token is `sbm_` + 40 random base62 characters, shown once; only its SHA-256 is stored (as for
API keys, the entropy makes a fast hash enough). A token belongs to one organisation and acts
with a role that is never more than its creator's current role there (permissions.py).
"""

from __future__ import annotations

import hashlib
import secrets
import string
from datetime import timedelta

from django.utils import timezone

from portal.models import ManagementToken, Membership, Organization
from portal.permissions import Action, can, role_at_most
from portal.services import OrganizationError

TOKEN_PREFIX = "sbm_"  # noqa: S105 (a prefix, not a secret)
BODY_LENGTH = 40
DISPLAY_PREFIX_LENGTH = len(TOKEN_PREFIX) + 8
# A token's last_used_at is precise to this much (no write on every call).
LAST_USED_RESOLUTION = timedelta(seconds=60)
_BASE62 = string.digits + string.ascii_letters


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def management_token_refusal(*, membership: Membership, role: str) -> str | None:
    """Why this member may not create a token with this role, or None when they may."""
    if role not in Membership.Role.values:
        return f"unknown role {role!r}"
    if not can(membership, Action.TOKEN_MANAGE):
        return "only owners and admins create management tokens"
    if role_at_most(role, membership.role) != role:
        return "a token cannot have a role above its creator's"
    return None


def management_token_create(
    *, membership: Membership, name: str, role: str
) -> tuple[ManagementToken, str]:
    """Create a token for the member's organisation; returns the row and the secret (shown once).

    Only owners and admins create tokens, and never with a role above their own.
    """
    name = name.strip()
    if not name:
        raise OrganizationError("a management token needs a name")
    refusal = management_token_refusal(membership=membership, role=role)
    if refusal:
        raise OrganizationError(refusal)
    secret = TOKEN_PREFIX + "".join(secrets.choice(_BASE62) for _ in range(BODY_LENGTH))
    token = ManagementToken.objects.create(
        organization_id=membership.organization_id,
        name=name[:100],  # the column's length, as an API key's name is cut
        prefix=secret[:DISPLAY_PREFIX_LENGTH],
        hashed_token=hash_token(secret),
        role=role,
        created_by_id=membership.user_id,
    )
    return token, secret


def management_token_revoke(*, token: ManagementToken) -> None:
    """Revoke a token; it stops working at once (tokens are not cached)."""
    ManagementToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )
    token.refresh_from_db(fields=["revoked_at"])


def management_token_membership(*, secret: str) -> tuple[ManagementToken, Membership] | None:
    """The token behind a secret and the membership it acts as; None for an unknown or revoked
    token, or one whose creator is no longer a member.

    The membership is not saved: it carries the token's organisation and creator, with the
    lower of the token's role and the creator's current one.
    """
    if not secret.startswith(TOKEN_PREFIX):
        return None
    token = (
        ManagementToken.objects.select_related("organization", "created_by")
        .filter(hashed_token=hash_token(secret), revoked_at__isnull=True)
        .first()
    )
    if token is None:
        return None
    creator_role = (
        Membership.objects.filter(
            organization_id=token.organization_id, user_id=token.created_by_id
        )
        .values_list("role", flat=True)
        .first()
    )
    if creator_role is None:
        return None
    now = timezone.now()
    if token.last_used_at is None or token.last_used_at < now - LAST_USED_RESOLUTION:
        ManagementToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token, Membership(
        organization=token.organization,
        user=token.created_by,
        role=role_at_most(token.role, creator_role),
    )


def management_tokens_of(*, organization: Organization) -> list[ManagementToken]:
    """The organisation's tokens, newest first (revoked ones included, for the record)."""
    return list(
        ManagementToken.objects.filter(organization=organization)
        .select_related("created_by")
        .order_by("-created_at", "-pk")
    )


def management_token_get(*, organization: Organization, token_id: int) -> ManagementToken | None:
    return ManagementToken.objects.filter(organization=organization, pk=token_id).first()
