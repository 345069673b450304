"""What each role may do through the management API: the one table of role rules it reads.

Members manage their own API keys; admins every key and its limits; owners everything admins
do plus members and billing. Every management API view asks `role_allows` before acting.
"""

from __future__ import annotations

from enum import StrEnum

from portal.models import Membership

Role = Membership.Role

# Lowest to highest: a token's role is capped at its creator's with `role_at_most`.
_RANK = {Role.MEMBER: 0, Role.ADMIN: 1, Role.OWNER: 2}


class Action(StrEnum):
    VIEW_ORGANIZATION = "view_organization"
    VIEW_MEMBERS = "view_members"
    VIEW_BALANCE = "view_balance"
    MANAGE_OWN_KEYS = "manage_own_keys"  # create keys; see, change and revoke one's own
    MANAGE_ALL_KEYS = "manage_all_keys"  # see, change and revoke every key of the organisation
    VIEW_ALL_USAGE = "view_all_usage"  # usage and the request log of every key (else: own keys)
    MANAGE_TOKENS = "manage_tokens"  # create, list and revoke management tokens


_ALLOWED: dict[Action, frozenset[str]] = {
    Action.VIEW_ORGANIZATION: frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER}),
    Action.VIEW_MEMBERS: frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER}),
    Action.VIEW_BALANCE: frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER}),
    Action.MANAGE_OWN_KEYS: frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER}),
    Action.MANAGE_ALL_KEYS: frozenset({Role.OWNER, Role.ADMIN}),
    Action.VIEW_ALL_USAGE: frozenset({Role.OWNER, Role.ADMIN}),
    Action.MANAGE_TOKENS: frozenset({Role.OWNER, Role.ADMIN}),
}


def role_allows(role: str, action: Action) -> bool:
    """True when a member with `role` may perform `action`."""
    return role in _ALLOWED[action]


def role_at_most(role: str, ceiling: str) -> str:
    """The lower of two roles."""
    return role if _RANK[Role(role)] <= _RANK[Role(ceiling)] else ceiling
