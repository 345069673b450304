"""The dashboard shell: which organisation a page is about.

A page names its organisation with `?org=<slug>` (a form with a hidden `org` field); the choice
is remembered in the session, and without one the user's first organisation is shown. Only the
user's own organisations can be chosen: any other slug is a 404, whether or not it exists.
"""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser
from django.http import Http404, HttpRequest

from portal.models import Membership, User
from portal.selectors import OrganizationNotFound, membership_get

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
