"""Step 1 of the request path: who is calling.

The checksum rejects malformed keys before any lookup. Well-formed keys are looked up by hash
through a per-process cache, for GATEWAY_KEY_CACHE_SECONDS, so a revocation takes effect
everywhere within that bound. Unknown keys are cached too (negative caching), so a client
retrying a bad key does not cost a query per attempt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings

from gateway.errors import InvalidApiKey
from portal import api_keys
from portal.selectors import api_key_find


@dataclass(frozen=True, slots=True)
class Caller:
    api_key_id: int
    organization_id: int


# hash -> (expires at, caller or None for unknown/revoked keys)
_cache: dict[str, tuple[float, Caller | None]] = {}
_CACHE_MAX_ENTRIES = 100_000


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def authenticate(raw_key: str) -> Caller:
    """The caller behind an API key; InvalidApiKey for a malformed, unknown or revoked key."""
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
        key = await api_key_find(hashed_key=hashed)
        caller = (
            Caller(api_key_id=key.pk, organization_id=key.organization_id)
            if key is not None and not key.is_revoked
            else None
        )
        if len(_cache) >= _CACHE_MAX_ENTRIES:
            _cache.clear()
        _cache[hashed] = (now + settings.GATEWAY_KEY_CACHE_SECONDS, caller)
    if caller is None:
        raise InvalidApiKey("Invalid API key, or the key has been revoked.")
    return caller


def forget_cached_keys() -> None:
    """Drop every cached lookup (tests, and after a revocation in this process)."""
    _cache.clear()
