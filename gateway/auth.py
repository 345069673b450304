"""Step 1 of the request path: who is calling.

The checksum rejects malformed keys before any lookup. Well-formed keys are looked up by hash
through a per-process cache, for GATEWAY_KEY_CACHE_SECONDS, so a revocation takes effect
everywhere within that bound. Unknown keys are cached too (negative caching), so a client
retrying a bad key does not cost a query per attempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

from billing.models import SpendCap
from billing.services import CapTerms
from gateway.database import db_call, load_once
from gateway.errors import AddressNotAllowed, InvalidApiKey
from gateway.limits import NO_LIMITS, RateLimits
from portal import api_keys
from portal.models import ApiKey


@dataclass(frozen=True, slots=True)
class Caller:
    api_key_id: int
    organization_id: int
    limits: RateLimits = NO_LIMITS
    allowed_models: frozenset[str] = frozenset()  # empty: every model
    expires_at: datetime | None = None
    spend_cap: CapTerms | None = None
    ip_networks: tuple[api_keys.IpNetwork, ...] = ()  # empty: any

    def may_use(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def may_connect_from(self, host: str | None) -> bool:
        """True when the key has no IP allowlist or the client address is inside it."""
        return api_keys.address_allowed(self.ip_networks, host)


def _caller_from(key: ApiKey) -> Caller:
    cap: SpendCap | None = getattr(key, "spend_cap", None)
    return Caller(
        api_key_id=key.pk,
        organization_id=key.organization_id,
        limits=RateLimits(
            requests_per_minute=key.requests_per_minute,
            tokens_per_minute=key.tokens_per_minute,
            max_concurrent_requests=key.max_concurrent_requests,
        ),
        allowed_models=frozenset(str(name) for name in key.allowed_models or ()),
        expires_at=key.expires_at,
        spend_cap=(
            CapTerms(amount_usd=cap.amount_usd, window=SpendCap.Window(cap.window))
            if cap is not None
            else None
        ),
        ip_networks=api_keys.allowlist_networks(key.ip_allowlist),
    )


# hash -> (expires at, caller or None for unknown/revoked keys)
_cache: dict[str, tuple[float, Caller | None]] = {}
_CACHE_MAX_ENTRIES = 100_000


@db_call
def _key_by_hash(hashed: str) -> ApiKey | None:
    return ApiKey.objects.select_related("spend_cap").filter(hashed_key=hashed).first()


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def client_host_of(request: Any) -> str | None:
    """The client's address from the ASGI scope (behind a proxy, run uvicorn with
    --proxy-headers and --forwarded-allow-ips so the scope holds the real client)."""
    client = getattr(request, "scope", {}).get("client")
    return str(client[0]) if client else None


async def authenticate(raw_key: str, *, client_host: str | None = None) -> Caller:
    """The caller behind an API key; InvalidApiKey for a malformed, unknown or revoked key,
    AddressNotAllowed when the key has an IP allowlist and `client_host` is outside it."""
    if not raw_key:
        raise InvalidApiKey("Missing API key: send it as 'Authorization: Bearer <key>'.")
    if not api_keys.is_well_formed(raw_key):
        raise InvalidApiKey("Invalid API key.")
    hashed = api_keys.hash_key(raw_key)
    now = time.monotonic()
    cached = _cache.get(hashed)
    if cached is not None and cached[0] > now:
        caller = cached[1]
    else:
        key = await load_once(("api_key", hashed), lambda: _key_by_hash(hashed))
        caller = _caller_from(key) if key is not None and not key.is_revoked else None
        if len(_cache) >= _CACHE_MAX_ENTRIES:
            _cache.clear()
        _cache[hashed] = (now + settings.GATEWAY_KEY_CACHE_SECONDS, caller)
    if caller is None:
        raise InvalidApiKey("Invalid API key, or the key has been revoked.")
    if caller.expires_at is not None and caller.expires_at <= timezone.now():
        raise InvalidApiKey("This API key has expired.")
    if not caller.may_connect_from(client_host):
        raise AddressNotAllowed("This API key may not be used from your IP address.")
    return caller


def forget_cached_keys() -> None:
    """Drop every cached lookup (tests, and after a revocation in this process)."""
    _cache.clear()
