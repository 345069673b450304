"""What every management API view under `organizations/<slug:organization>/` shares.

`RoleRequired` resolves the caller's membership of the organisation named in the URL into
`view.membership` (404 for an organisation that is not the caller's, whether or not it exists)
and asks portal/permissions.py whether its role may do the view's action for the request's
method (403 otherwise). Kept apart from api_auth.py, which DRF's settings import while
`rest_framework.views` itself is loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.views import APIView

from portal.api_auth import caller_membership
from portal.models import Membership
from portal.permissions import Action, can


def role_refusal(membership: Membership, action: Action) -> PermissionDenied:
    """The 403 the API answers when the member's role may not do `action`."""
    return PermissionDenied(f"Your role ({membership.role}) does not allow {action.value}.")


def require_api(membership: Membership, action: Action, obj: object = None) -> None:
    """portal.permissions.require, answered in DRF's error format (403)."""
    if not can(membership, action, obj):
        raise role_refusal(membership, action)


class RoleRequired(BasePermission):
    """Resolves `view.membership` and checks `view.required_actions[request.method]`."""

    def has_permission(self, request: Request, view: Any) -> bool:
        membership = caller_membership(request, view.kwargs["organization"])
        view.membership = membership
        action = view.required_actions.get(request.method)
        if action is not None:
            require_api(membership, action)
        return True


class OrganizationScoped(APIView):
    """Base of the API views under an organisation.

    `required_actions` maps an HTTP method to the action the caller's role must allow; checks
    on the object itself (whose key it is) happen in the view, with `require_api`.
    """

    permission_classes = [IsAuthenticated, RoleRequired]
    required_actions: ClassVar[Mapping[str, Action]] = {}
    membership: Membership
