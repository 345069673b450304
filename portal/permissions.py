"""Who may do what in an organisation: the one place the role rules live.

Every page (and the management API) asks `can(membership, action, obj)` before acting, where
`membership` is the caller's membership of the organisation the request is about (None for an
outsider) and `obj` the object acted on, if any. The roles:

- member: sees the organisation, its balance and statements, creates keys, and manages
  (renames, revokes, rotates) the keys they created and sees their usage; may leave.
- admin: a member who manages every key of the organisation and its limits (spend cap, rates,
  allowed models, expiry, IP allowlist), sees every key's usage, manages the management
  tokens scripts call the API with, and manages billing (pays for credit, sets auto top-up and
  the balance alert): the issue's "billing-capable role".
- owner: an admin who also manages the members (invites, removes, changes roles) and the
  invitations, and can hand ownership over. An organisation has exactly one owner,
  who cannot leave without transferring ownership first.

An object of another organisation is never allowed, whatever the role. The pages and the
management API (portal/api_auth.py's `RoleRequired`) both ask here.
"""

from __future__ import annotations

from enum import StrEnum

from django.core.exceptions import PermissionDenied

from portal.models import ApiKey, Invitation, ManagementToken, Membership

Role = Membership.Role


class Action(StrEnum):
    ORG_VIEW = "org.view"
    ORG_LEAVE = "org.leave"
    ORG_TRANSFER = "org.transfer"
    BILLING_VIEW = "billing.view"  # the balance and the statements
    BILLING_MANAGE = "billing.manage"  # pay for credit, auto top-up, balance alert settings
    MEMBER_VIEW = "member.view"
    MEMBER_INVITE = "member.invite"
    MEMBER_REMOVE = "member.remove"
    MEMBER_CHANGE_ROLE = "member.change_role"
    INVITATION_REVOKE = "invitation.revoke"
    KEY_CREATE = "key.create"
    KEY_VIEW_ALL = "key.view_all"
    KEY_MANAGE = "key.manage"  # rename, revoke, rotate (obj: the key)
    KEY_EDIT_LIMITS = "key.edit_limits"  # obj: the key
    USAGE_VIEW_ALL = "usage.view_all"  # every key's usage and request log (else: one's own keys)
    TOKEN_MANAGE = "token.manage"  # noqa: S105 (a name, not a secret): create, list, revoke tokens


_MEMBER = {Role.MEMBER, Role.ADMIN, Role.OWNER}
_ADMIN = {Role.ADMIN, Role.OWNER}
_OWNER = {Role.OWNER}

# Lowest to highest: a management token acts with the lower of its role and its creator's.
_RANK = {Role.MEMBER: 0, Role.ADMIN: 1, Role.OWNER: 2}

# The roles allowed each action, before the object checks below.
ROLES_ALLOWED: dict[Action, set[Membership.Role]] = {
    Action.ORG_VIEW: _MEMBER,
    Action.ORG_LEAVE: {Role.MEMBER, Role.ADMIN},  # an owner transfers ownership first
    Action.ORG_TRANSFER: _OWNER,
    Action.BILLING_VIEW: _MEMBER,
    Action.BILLING_MANAGE: _ADMIN,
    Action.MEMBER_VIEW: _MEMBER,
    Action.MEMBER_INVITE: _OWNER,
    Action.MEMBER_REMOVE: _OWNER,
    Action.MEMBER_CHANGE_ROLE: _OWNER,
    Action.INVITATION_REVOKE: _OWNER,
    Action.KEY_CREATE: _MEMBER,
    Action.KEY_VIEW_ALL: _ADMIN,
    Action.KEY_MANAGE: _MEMBER,  # a member: only their own keys (below)
    Action.KEY_EDIT_LIMITS: _ADMIN,
    Action.USAGE_VIEW_ALL: _ADMIN,
    Action.TOKEN_MANAGE: _ADMIN,
}


def _organization_id_of(obj: object) -> int | None:
    if isinstance(obj, ApiKey | Invitation | ManagementToken | Membership):
        return obj.organization_id
    return None


def can(membership: Membership | None, action: Action | str, obj: object = None) -> bool:
    """True when the holder of `membership` may do `action` (to `obj`, when given)."""
    if membership is None:
        return False
    action = Action(action)
    if membership.role not in ROLES_ALLOWED[action]:
        return False
    if obj is not None and _organization_id_of(obj) != membership.organization_id:
        return False
    if action is Action.KEY_MANAGE and membership.role == Role.MEMBER:
        return isinstance(obj, ApiKey) and obj.created_by_id == membership.user_id
    if action in {Action.MEMBER_REMOVE, Action.MEMBER_CHANGE_ROLE} and isinstance(obj, Membership):
        # The owner's own membership changes only by transferring ownership.
        return obj.role != Role.OWNER
    return True


def require(membership: Membership | None, action: Action | str, obj: object = None) -> None:
    """Raise PermissionDenied (a 403 on pages and in DRF) unless `can(...)`."""
    if not can(membership, action, obj):
        raise PermissionDenied(f"your role may not do {Action(action).value}")


def role_at_most(role: str, ceiling: str) -> str:
    """The lower of two roles."""
    return role if _RANK[Role(role)] <= _RANK[Role(ceiling)] else ceiling
