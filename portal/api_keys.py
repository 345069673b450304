"""The API key format: what a key looks like, how it is generated, checked and hashed.

A key is `sb_` + 32 random base62 characters + a 6-character base62 CRC-32 of the random
part, e.g. `sb_4fQk…Zt1x9Aa0c`. The prefix makes leaked keys easy to find by secret scanners;
the checksum lets the gateway reject a mistyped or made-up key without touching the database.
Only the SHA-256 of the whole key is stored: keys carry 190 bits of entropy, so a fast hash is
enough (no password-style stretching is needed) and lookups stay a single indexed query.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import string
import zlib
from collections.abc import Iterable

KEY_PREFIX = "sb_"
BODY_LENGTH = 32
CHECKSUM_LENGTH = 6
KEY_LENGTH = len(KEY_PREFIX) + BODY_LENGTH + CHECKSUM_LENGTH
# How much of the key is kept in clear to identify it in lists ("sb_4fQkP2…").
DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 8

_BASE62 = string.digits + string.ascii_letters
_BASE62_SET = frozenset(_BASE62)


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 62)
        digits.append(_BASE62[remainder])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def generate_key() -> str:
    """A new random key with its checksum."""
    body = "".join(secrets.choice(_BASE62) for _ in range(BODY_LENGTH))
    return KEY_PREFIX + body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """True when the key has the right shape and checksum; needs no database."""
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return False
    rest = key[len(KEY_PREFIX) :]
    if not _BASE62_SET.issuperset(rest):
        return False
    body, checksum = rest[:BODY_LENGTH], rest[BODY_LENGTH:]
    return secrets.compare_digest(_checksum(body), checksum)


def hash_key(key: str) -> str:
    """The stored form of a key: hex SHA-256."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LENGTH]


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowlist_networks(allowlist: Iterable[str] | None) -> tuple[IpNetwork, ...]:
    """A key's IP allowlist (addresses or CIDR ranges, validated when saved) as networks."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in allowlist or ())


def address_allowed(networks: tuple[IpNetwork, ...], host: str | None) -> bool:
    """True when there is no allowlist or the client address is inside it. The gateway and the
    management API's `GET /api/v1/key` both ask here."""
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False  # no address (or a unix socket): refuse rather than guess
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
