"""Writes for users, organisations and API keys (selectors.py has the reads)."""

from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from portal import api_keys
from portal.models import ApiKey, Membership, Organization, User


class OrganizationError(Exception):
    """A request about an organisation that cannot be carried out; the message says why."""


def _unique_slug(name: str) -> str:
    base = slugify(name)[:50] or "org"
    slug, n = base, 1
    while Organization.objects.filter(slug=slug).exists():
        n += 1
        slug = f"{base}-{n}"
    return slug


def organization_create(*, name: str, owner_email: str) -> Organization:
    """Create an organisation owned by the user with `owner_email` (created if new).

    The slug is derived from the name and made unique with a numeric suffix.
    """
    name = name.strip()
    if not name:
        raise OrganizationError("an organisation needs a name")
    email = owner_email.strip().lower()
    if "@" not in email:
        raise OrganizationError(f"not an e-mail address: {owner_email!r}")
    with transaction.atomic():
        owner = User.objects.filter(email=email).first()
        if owner is None:
            # No password yet: the owner sets one through password reset / sign-up.
            owner = User.objects.create_user(email=email, password=None)
        return _organization_create_owned(name=name, owner=owner)


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
        name=name,
        prefix=api_keys.display_prefix(secret),
        hashed_key=api_keys.hash_key(secret),
        created_by=created_by,
    )
    return key, secret


def api_key_revoke(*, api_key: ApiKey) -> None:
    """Revoke a key. Gateways stop accepting it within GATEWAY_KEY_CACHE_SECONDS."""
    ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db(fields=["revoked_at"])


def api_key_update(
    *,
    api_key: ApiKey,
    name: str,
    expires_at: datetime | None,
    allowed_models: list[str],
    requests_per_minute: int | None,
    tokens_per_minute: int | None,
    max_concurrent_requests: int | None,
) -> ApiKey:
    """Set a key's name and limits (None or [] for unlimited). Gateways pick the change up
    within GATEWAY_KEY_CACHE_SECONDS. A revoked key cannot be changed."""
    name = name.strip()
    if not name:
        raise OrganizationError("an API key needs a name")
    if api_key.is_revoked:
        raise OrganizationError("a revoked key cannot be changed")
    for label, value in (
        ("requests per minute", requests_per_minute),
        ("tokens per minute", tokens_per_minute),
        ("concurrent requests", max_concurrent_requests),
    ):
        if value is not None and value < 1:
            raise OrganizationError(f"{label} must be at least 1 (or empty for unlimited)")
    models_allowed = sorted({model.strip() for model in allowed_models if model.strip()})
    api_key.name = name
    api_key.expires_at = expires_at
    api_key.allowed_models = models_allowed
    api_key.requests_per_minute = requests_per_minute
    api_key.tokens_per_minute = tokens_per_minute
    api_key.max_concurrent_requests = max_concurrent_requests
    api_key.save(
        update_fields=[
            "name",
            "expires_at",
            "allowed_models",
            "requests_per_minute",
            "tokens_per_minute",
            "max_concurrent_requests",
        ]
    )
    return api_key
