"""The dashboard shell: which organisation a page is about.

A page names its organisation with `?org=<slug>` (a form with a hidden `org` field); the choice
is remembered in the session, and without one the user's first organisation is shown. Only the
user's own organisations can be chosen: any other slug is a 404, whether or not it exists.

The POST views that act on the organisation are wrapped in `member_may` (an action on the
organisation) or `member_may_on` (an action on one of its objects, fetched through the
membership): login, POST only, the membership, the object (404 outside the organisation), then
portal.permissions (403), in that order, before the view body runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import TypeVar

from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import AnonymousUser
from django.http import Http404, HttpRequest, HttpResponse
from django.views.decorators.http import require_POST

from portal.models import ApiKey, Invitation, Membership, User
from portal.permissions import Action, require
from portal.selectors import (
    ApiKeyNotFound,
    InvitationNotFound,
    MembershipNotFound,
    OrganizationNotFound,
    api_key_get_manageable,
    invitation_get,
    member_get,
    membership_get,
)

SESSION_KEY = "dashboard_org"


def request_user(request: HttpRequest) -> User:
    """The logged-in user (views calling this are behind login_required)."""
    user = request.user
    if isinstance(user, AnonymousUser) or not isinstance(user, User):
        raise Http404("not logged in")
    return user


def current_membership(request: HttpRequest) -> Membership:
    """The requesting user's membership of the organisation the page is about; 404 otherwise."""
    user = request_user(request)
    asked = request.POST.get("org") or request.GET.get("org")
    remembered = request.session.get(SESSION_KEY)
    try:
        if asked:
            membership = membership_get(user=user, organization_slug=asked)
        else:
            try:
                membership = membership_get(user=user, organization_slug=remembered)
            except OrganizationNotFound:
                # The remembered organisation is gone or the user left it: fall back.
                membership = membership_get(user=user)
    except OrganizationNotFound:
        raise Http404("no such organisation") from None
    request.session[SESSION_KEY] = membership.organization.slug
    return membership


# The objects of the member's organisation a page acts on: any other id is a 404.


def api_key_or_404(membership: Membership, api_key_id: int) -> ApiKey:
    """A key the member may see; any other id (another member's, another org's) is a 404."""
    try:
        return api_key_get_manageable(membership=membership, api_key_id=api_key_id)
    except ApiKeyNotFound:
        raise Http404("no such API key") from None


def member_or_404(membership: Membership, member_id: int) -> Membership:
    try:
        return member_get(membership=membership, member_id=member_id)
    except MembershipNotFound:
        raise Http404("no such member") from None


def invitation_or_404(membership: Membership, invitation_id: int) -> Invitation:
    try:
        return invitation_get(membership=membership, invitation_id=invitation_id)
    except InvitationNotFound:
        raise Http404("no such invitation") from None


T = TypeVar("T")
MemberView = Callable[[HttpRequest, Membership], HttpResponse]
ObjectView = Callable[[HttpRequest, Membership, T], HttpResponse]


def member_may(action: Action) -> Callable[[MemberView], Callable[..., HttpResponse]]:
    """A POST view the current member calls as `view(request, membership)` once their role
    may do `action` in the organisation."""

    def decorate(view: MemberView) -> Callable[..., HttpResponse]:
        @login_required
        @require_POST
        @wraps(view)
        def wrapper(request: HttpRequest) -> HttpResponse:
            membership = current_membership(request)
            require(membership, action)
            return view(request, membership)

        return wrapper

    return decorate


def member_may_on(
    action: Action, fetch: Callable[[Membership, int], T]
) -> Callable[[ObjectView[T]], Callable[..., HttpResponse]]:
    """A POST view on one object of the organisation, called as `view(request, membership,
    obj)`. `fetch(membership, id)` finds the object through the membership (the URL's one
    parameter is its id) and raises Http404 for any other; then the role must allow `action`
    on it."""

    def decorate(view: ObjectView[T]) -> Callable[..., HttpResponse]:
        @login_required
        @require_POST
        @wraps(view)
        def wrapper(request: HttpRequest, **url_kwargs: int) -> HttpResponse:
            membership = current_membership(request)
            (object_id,) = url_kwargs.values()
            obj = fetch(membership, object_id)
            require(membership, action, obj)
            return view(request, membership, obj)

        return wrapper

    return decorate
