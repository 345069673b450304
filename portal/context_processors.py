"""Template context for the page header: the organisation switcher."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest

from portal.dashboard import SESSION_KEY
from portal.models import User
from portal.selectors import memberships_of_user


def organization_switcher(request: HttpRequest) -> dict[str, Any]:
    """The logged-in user's memberships and the current organisation's slug (lazily: pages
    that do not render the header run no query)."""
    user = getattr(request, "user", None)
    if not isinstance(user, User):
        return {}
    return {
        "switcher_memberships": lambda: list(memberships_of_user(user=user)),
        "switcher_current": request.session.get(SESSION_KEY, ""),
    }
