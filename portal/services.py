"""Writes for users, organisations and API keys (selectors.py has the reads)."""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.dispatch import Signal
from django.utils import timezone
from django.utils.text import slugify

from portal import api_keys
from portal.models import ApiKey, Invitation, Membership, Organization, User

# Sent inside the rotation's transaction with `old` and `new` (ApiKey): layers above copy what
# they keep about a key (billing: its spend cap) to the new one.
api_key_rotated = Signal()


class OrganizationError(Exception):
    """A request about an organisation that cannot be carried out; the message says why."""


def _unique_slug(name: str) -> str:
    base = slugify(name)[:50] or "org"
    slug, n = base, 1
    while Organization.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    return slug


# The longest address the user and invitation columns hold (RFC 5321's path limit).
EMAIL_MAX_LENGTH = 254


def _email_normalized(email: str) -> str:
    """An address as stored (trimmed, lower case); OrganizationError if it is not one the
    columns can hold, rather than a database error at the insert."""
    normalized = email.strip().lower()
    if "@" not in normalized:
        raise OrganizationError(f"not an e-mail address: {email!r}")
    if len(normalized) > EMAIL_MAX_LENGTH:
        raise OrganizationError(f"an e-mail address has at most {EMAIL_MAX_LENGTH} characters")
    return normalized


def organization_create(*, name: str, owner_email: str) -> Organization:
    """Create an organisation owned by the user with `owner_email` (created if new).

    The slug is derived from the name and made unique with a numeric suffix.
    """
    name = name.strip()
    if not name:
        raise OrganizationError("an organisation needs a name")
    email = _email_normalized(owner_email)
    with transaction.atomic():
        owner = User.objects.filter(email=email).first()
        if owner is None:
            # No password yet: the owner sets one through password reset / sign-up.
            owner = User.objects.create_user(email=email, password=None)
        return _organization_create_owned(name=name[:200], owner=owner)


def organization_provision(*, name: str, owner_email: str) -> tuple[Organization, bool]:
    """The organisation named `name` that the user with `owner_email` owns, created (as
    organization_create does) if there is none; True when created. What a provisioning
    script calls, so that running it twice leaves one organisation, not two."""
    email = _email_normalized(owner_email)
    existing = (
        Organization.objects.filter(
            name=name.strip()[:200],
            membership__user__email=email,
            membership__role=Membership.Role.OWNER,
        )
        .order_by("pk")
        .first()
    )
    if existing is not None:
        return existing, False
    return organization_create(name=name, owner_email=email), True


def organization_create_personal(*, user: User) -> Organization:
    """Create the organisation a user gets on sign-up, named after their e-mail address."""
    local_part = user.email.split("@", 1)[0]
    with transaction.atomic():
        return _organization_create_owned(name=f"{local_part} (personal)", owner=user)


def _organization_create_owned(*, name: str, owner: User) -> Organization:
    organization = Organization.objects.create(name=name, slug=_unique_slug(name))
    Membership.objects.create(organization=organization, user=owner, role=Membership.Role.OWNER)
    return organization


def api_key_create(
    *, organization: Organization, name: str, created_by: User | None = None
) -> tuple[ApiKey, str]:
    """Create a key for the organisation; returns the row and the secret, shown only once."""
    name = name.strip()
    if not name:
        raise OrganizationError("an API key needs a name")
    secret = api_keys.generate_key()
    key = ApiKey.objects.create(
        organization=organization,
        name=name[:100],  # the column's length, as a rename cuts it
        prefix=api_keys.display_prefix(secret),
        hashed_key=api_keys.hash_key(secret),
        created_by=created_by,
    )
    return key, secret


def api_key_revoke(*, api_key: ApiKey) -> None:
    """Revoke a key. Gateways stop accepting it within GATEWAY_KEY_CACHE_SECONDS."""
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db(fields=["revoked_at"])


def organization_create_for_user(*, user: User, name: str) -> Organization:
    """Create another organisation, owned by `user`."""
    name = name.strip()
    if not name:
        raise OrganizationError("an organisation needs a name")
    with transaction.atomic():
        return _organization_create_owned(name=name[:200], owner=user)


# --- Invitations -----------------------------------------------------------------------------


def invitation_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invitation_create(
    *,
    organization: Organization,
    email: str,
    role: str,
    invited_by: User,
    site_url: str,
) -> tuple[Invitation, str]:
    """Invite `email` to join with `role` (member or admin) and e-mail them the accept link.

    `site_url` is the site's root URL (the link is built on it). Returns the invitation and its
    token; only the token's hash is stored. A pending invitation to the same address is replaced.
    """
    email = _email_normalized(email)
    if role not in {Membership.Role.MEMBER, Membership.Role.ADMIN}:
        raise OrganizationError("invite as member or admin; ownership is transferred instead")
    if Membership.objects.filter(organization=organization, user__email=email).exists():
        raise OrganizationError(f"{email} is already a member")
    token = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        Invitation.objects.filter(
            organization=organization, email=email, state=Invitation.State.PENDING
        ).update(state=Invitation.State.REVOKED, answered_at=now)
        invitation = Invitation.objects.create(
            organization=organization,
            email=email,
            role=role,
            hashed_token=invitation_token_hash(token),
            invited_by=invited_by,
            expires_at=now + timedelta(days=settings.INVITATION_VALID_DAYS),
        )
        link = f"{site_url.rstrip('/')}/invitations/{token}/"
        transaction.on_commit(
            lambda: send_mail(
                subject=f"Join {organization.name} on Switchboard",
                message=(
                    f"{invited_by.email} invites you to join {organization.name} on Switchboard "
                    f"as {invitation.get_role_display()}.\n\n"
                    f"Log in (or sign up) with this address, {email}, then accept or decline:\n"
                    f"{link}\n\nThe link expires on {invitation.expires_at:%Y-%m-%d %H:%M} UTC."
                ),
                from_email=None,
                recipient_list=[email],
            )
        )
    return invitation, token


def _pending_invitation_for(*, token: str, user: User) -> Invitation:
    """The pending, unexpired invitation behind `token`, locked, addressed to `user`."""
    invitation = (
        Invitation.objects.select_for_update()
        .select_related("organization")
        .filter(hashed_token=invitation_token_hash(token))
        .first()
    )
    if invitation is None:
        raise OrganizationError("this invitation does not exist")
    if invitation.email != user.email.lower():
        raise OrganizationError(
            f"this invitation is for another e-mail address; log in as {invitation.email}"
        )
    if invitation.state != Invitation.State.PENDING:
        raise OrganizationError(f"this invitation was already {invitation.state}")
    if invitation.expires_at <= timezone.now():
        raise OrganizationError("this invitation has expired; ask for a new one")
    return invitation


def invitation_accept(*, token: str, user: User) -> Membership:
    """Join the organisation with the invited role. The user's e-mail must be the invited one."""
    with transaction.atomic():
        invitation = _pending_invitation_for(token=token, user=user)
        if Membership.objects.filter(organization=invitation.organization, user=user).exists():
            raise OrganizationError("you are already a member of this organisation")
        membership = Membership.objects.create(
            organization=invitation.organization, user=user, role=invitation.role
        )
        invitation.state = Invitation.State.ACCEPTED
        invitation.answered_at = timezone.now()
        invitation.save(update_fields=["state", "answered_at"])
        return membership


def invitation_decline(*, token: str, user: User) -> Invitation:
    """Refuse an invitation addressed to the user; it cannot be accepted afterwards."""
    with transaction.atomic():
        invitation = _pending_invitation_for(token=token, user=user)
        invitation.state = Invitation.State.DECLINED
        invitation.answered_at = timezone.now()
        invitation.save(update_fields=["state", "answered_at"])
        return invitation


def invitation_revoke(*, invitation: Invitation) -> None:
    """Withdraw a pending invitation (its link stops working)."""
    Invitation.objects.filter(pk=invitation.pk, state=Invitation.State.PENDING).update(
        state=Invitation.State.REVOKED, answered_at=timezone.now()
    )


# --- Members ---------------------------------------------------------------------------------


def membership_remove(*, membership: Membership, revoke_their_keys: bool = False) -> None:
    """Remove a member (never the owner). Their keys belong to the organisation and keep
    working unless `revoke_their_keys`, so integrations do not break when someone leaves."""
    with transaction.atomic():
        locked = Membership.objects.select_for_update().get(pk=membership.pk)
        if locked.role == Membership.Role.OWNER:
            raise OrganizationError("the owner cannot be removed; transfer ownership first")
        if revoke_their_keys:
            ApiKey.objects.filter(
                organization_id=locked.organization_id,
                created_by_id=locked.user_id,
                revoked_at__isnull=True,
            ).update(revoked_at=timezone.now())
        locked.delete()


def membership_leave(*, membership: Membership) -> None:
    """Leave an organisation (the owner transfers ownership first)."""
    membership_remove(membership=membership)


def membership_change_role(*, membership: Membership, role: str) -> Membership:
    """Make a member an admin or back (ownership moves only by transfer)."""
    if role not in {Membership.Role.MEMBER, Membership.Role.ADMIN}:
        raise OrganizationError("the role must be member or admin")
    with transaction.atomic():
        locked = Membership.objects.select_for_update().get(pk=membership.pk)
        if locked.role == Membership.Role.OWNER:
            raise OrganizationError("the owner's role changes only by transferring ownership")
        locked.role = role
        locked.save(update_fields=["role"])
        return locked


def ownership_transfer(*, organization: Organization, to_membership: Membership) -> None:
    """Make `to_membership` the owner; the previous owner stays on as an admin.

    Both rows are locked in one transaction, so the organisation has exactly one owner before
    and after (a partial unique index, one_owner_per_org, backs this up).
    """
    with transaction.atomic():
        rows = list(
            Membership.objects.select_for_update()
            .filter(organization=organization)
            .filter(Q(role=Membership.Role.OWNER) | Q(pk=to_membership.pk))
            .order_by("pk")
        )
        target = next((m for m in rows if m.pk == to_membership.pk), None)
        owner = next((m for m in rows if m.role == Membership.Role.OWNER), None)
        if target is None:
            raise OrganizationError("the new owner must be a member of the organisation")
        if owner is None or owner.pk == target.pk:
            raise OrganizationError("this member is already the owner")
        owner.role = Membership.Role.ADMIN
        owner.save(update_fields=["role"])
        target.role = Membership.Role.OWNER
        target.save(update_fields=["role"])


# --- API keys --------------------------------------------------------------------------------


def api_key_rename(*, api_key: ApiKey, name: str) -> ApiKey:
    name = name.strip()
    if not name:
        raise OrganizationError("an API key needs a name")
    api_key.name = name[:100]
    api_key.save(update_fields=["name"])
    return api_key


def ip_allowlist_normalized(entries: Iterable[str]) -> list[str]:
    """CIDR strings in canonical form ("10.0.0.7" -> "10.0.0.7/32"); OrganizationError if bad."""
    networks = []
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(str(ipaddress.ip_network(entry, strict=False)))
        except ValueError:
            raise OrganizationError(f"not an IP address or CIDR network: {entry!r}") from None
    return sorted(set(networks), key=networks.index)


# The largest limit a key's limit columns hold (PositiveIntegerField: a 32-bit integer in
# PostgreSQL); a larger one would fail in the database, not here.
API_KEY_LIMIT_MAX = 2_147_483_647


def api_key_limits_update(
    *,
    api_key: ApiKey,
    expires_at: datetime | None,
    allowed_models: list[str],
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    max_concurrent_requests: int | None,
    ip_allowlist: list[str],
) -> ApiKey:
    """Set a key's limits (None or empty: unlimited). Gateways see them within
    GATEWAY_KEY_CACHE_SECONDS. The spend cap is billing's (billing.services). A revoked key
    cannot be changed."""
    if api_key.is_revoked:
        raise OrganizationError("a revoked key cannot be changed")
    for label, value in (
        ("requests per minute", requests_per_minute),
        ("tokens per minute", tokens_per_minute),
        ("concurrent requests", max_concurrent_requests),
    ):
        if value is not None and not 1 <= value <= API_KEY_LIMIT_MAX:
            raise OrganizationError(
                f"{label} must be at least 1 and at most {API_KEY_LIMIT_MAX} "
                "(or empty for unlimited)"
            )
    api_key.expires_at = expires_at
    api_key.allowed_models = sorted({m.strip() for m in allowed_models if m.strip()})
    api_key.requests_per_minute = requests_per_minute
    api_key.tokens_per_minute = tokens_per_minute
    api_key.max_concurrent_requests = max_concurrent_requests
    api_key.ip_allowlist = ip_allowlist_normalized(ip_allowlist)
    api_key.save(update_fields=ApiKey.LIMIT_FIELDS)
    return api_key


def api_key_update(
    *,
    api_key: ApiKey,
    name: str,
    expires_at: datetime | None,
    allowed_models: list[str],
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    max_concurrent_requests: int | None,
    ip_allowlist: list[str],
) -> ApiKey:
    """Rename a key and set its limits at once (the management API's PATCH)."""
    with transaction.atomic():
        api_key_rename(api_key=api_key, name=name)
        return api_key_limits_update(
            api_key=api_key,
            expires_at=expires_at,
            allowed_models=allowed_models,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            max_concurrent_requests=max_concurrent_requests,
            ip_allowlist=ip_allowlist,
        )


def api_key_rotate(*, api_key: ApiKey, overlap: timedelta) -> tuple[ApiKey, str]:
    """Replace a key: a new key with the same name and limits, while the old one keeps working
    for `overlap` (then expires), so clients can switch without downtime. Returns the new key
    and its secret, shown once."""
    limit_hours = settings.API_KEY_MAX_ROTATION_OVERLAP_HOURS
    if overlap < timedelta(0) or overlap > timedelta(hours=limit_hours):
        raise OrganizationError(f"the overlap must be from 0 to {limit_hours} hours")
    with transaction.atomic():
        old = ApiKey.objects.select_for_update().get(pk=api_key.pk)
        now = timezone.now()
        if old.is_revoked or (old.expires_at is not None and old.expires_at <= now):
            raise OrganizationError("a revoked or expired key cannot be rotated")
        secret = api_keys.generate_key()
        new = ApiKey.objects.create(
            organization_id=old.organization_id,
            name=old.name,
            prefix=api_keys.display_prefix(secret),
            hashed_key=api_keys.hash_key(secret),
            created_by_id=old.created_by_id,  # still the same person's key
            expires_at=old.expires_at,
            allowed_models=old.allowed_models,
            requests_per_minute=old.requests_per_minute,
            tokens_per_minute=old.tokens_per_minute,
            max_concurrent_requests=old.max_concurrent_requests,
            ip_allowlist=old.ip_allowlist,
            rotated_from=old,
        )
        old.expires_at = now + overlap
        old.save(update_fields=["expires_at"])
        api_key_rotated.send(sender=ApiKey, old=old, new=new)
    api_key.refresh_from_db(fields=["expires_at"])
    return new, secret
