"""Portal's pages: organisations, members, invitations and API keys.

Each view finds the caller's membership of the page's organisation (portal.dashboard), fetches
objects only through selectors scoped to it (404 otherwise), asks portal.permissions.require
(403 otherwise), then calls one service. The POST views get the first three from
portal.dashboard's `member_may` / `member_may_on`.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from portal import services
from portal.dashboard import (
    SESSION_KEY,
    api_key_or_404,
    current_membership,
    invitation_or_404,
    member_may,
    member_may_on,
    member_or_404,
    request_user,
)
from portal.forms import ApiKeyRotateForm, InvitationForm, OrganizationCreateForm, RoleForm
from portal.models import ApiKey, Invitation, Membership
from portal.permissions import Action, can, require
from portal.selectors import (
    InvitationNotFound,
    OrganizationNotFound,
    invitation_by_token,
    invitations_pending,
    members_of,
    membership_get,
    memberships_of_user,
)
from portal.services import OrganizationError


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/home.html", {"api_base_url": request.build_absolute_uri("/v1")})


def _dashboard_url(organization_slug: str) -> str:
    # The dashboard page itself belongs to billing (it shows the balance); only its name is used.
    return f"{reverse('dashboard')}?org={organization_slug}"


def _organization_url(organization_slug: str) -> str:
    return f"{reverse('organization')}?org={organization_slug}"


def _show_secret(
    request: HttpRequest, membership: Membership, api_key: ApiKey, secret: str, **extra: object
) -> HttpResponse:
    """The page that shows a new secret, this once: it is not stored or redirected to."""
    response = render(
        request,
        "portal/api_key_created.html",
        {"organization": membership.organization, "api_key": api_key, "secret": secret, **extra},
    )
    response["Cache-Control"] = "no-store"
    return response


# --- Organisations ---------------------------------------------------------------------------


@login_required
@require_http_methods(["GET", "POST"])
def organizations(request: HttpRequest) -> HttpResponse:
    """The user's organisations, and a form to create another (its owner is the user)."""
    user = request_user(request)
    form = OrganizationCreateForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            organization = services.organization_create_for_user(
                user=user, name=form.cleaned_data["name"]
            )
        except OrganizationError as exc:
            messages.error(request, str(exc))
        else:
            request.session[SESSION_KEY] = organization.slug
            messages.success(request, f"Created {organization.name}; you are its owner.")
            return HttpResponseRedirect(_organization_url(organization.slug))
    return render(
        request,
        "portal/organizations.html",
        {"memberships": memberships_of_user(user=user), "form": form},
    )


@login_required
@require_POST
def organization_switch(request: HttpRequest) -> HttpResponse:
    """Make another of the user's organisations the current one (remembered in the session)."""
    try:
        membership = membership_get(
            user=request_user(request), organization_slug=request.POST.get("org", "")
        )
    except OrganizationNotFound:
        raise Http404("no such organisation") from None
    request.session[SESSION_KEY] = membership.organization.slug
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = reverse("dashboard")
    # The page's own ?org= would win over the session: drop the query string.
    return HttpResponseRedirect(target.split("?", 1)[0])


@login_required
@require_GET
def organization(request: HttpRequest) -> HttpResponse:
    """The current organisation's members and invitations, with what the caller may do."""
    if not memberships_of_user(user=request_user(request)).exists():
        return HttpResponseRedirect(reverse("dashboard"))  # it explains how to get one
    membership = current_membership(request)
    require(membership, Action.MEMBER_VIEW)
    return render(
        request,
        "portal/organization.html",
        {
            "membership": membership,
            "organization": membership.organization,
            "members": members_of(membership=membership),
            "invitations": (
                invitations_pending(membership=membership)
                if can(membership, Action.MEMBER_INVITE)
                else []
            ),
            "can_manage_members": can(membership, Action.MEMBER_INVITE),
            "can_transfer": can(membership, Action.ORG_TRANSFER),
            "can_leave": can(membership, Action.ORG_LEAVE),
            "invitation_form": InvitationForm(),
        },
    )


@member_may(Action.MEMBER_INVITE)
def member_invite(request: HttpRequest, membership: Membership) -> HttpResponse:
    form = InvitationForm(request.POST)
    slug = membership.organization.slug
    if not form.is_valid():
        messages.error(request, "Give an e-mail address and a role.")
        return HttpResponseRedirect(_organization_url(slug))
    try:
        invitation, _ = services.invitation_create(
            organization=membership.organization,
            email=form.cleaned_data["email"],
            role=form.cleaned_data["role"],
            invited_by=request_user(request),
            site_url=request.build_absolute_uri("/"),
        )
    except OrganizationError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Invited {invitation.email} as {invitation.role}.")
    return HttpResponseRedirect(_organization_url(slug))


@member_may_on(Action.INVITATION_REVOKE, invitation_or_404)
def invitation_revoke(
    request: HttpRequest, membership: Membership, invitation: Invitation
) -> HttpResponse:
    services.invitation_revoke(invitation=invitation)
    messages.success(request, f"Withdrew the invitation to {invitation.email}.")
    return HttpResponseRedirect(_organization_url(membership.organization.slug))


@member_may_on(Action.MEMBER_CHANGE_ROLE, member_or_404)
def member_change_role(
    request: HttpRequest, membership: Membership, member: Membership
) -> HttpResponse:
    form = RoleForm(request.POST)
    if form.is_valid():
        services.membership_change_role(membership=member, role=form.cleaned_data["role"])
        messages.success(request, f"{member.user.email} is now {form.cleaned_data['role']}.")
    else:
        messages.error(request, "Choose member or admin.")
    return HttpResponseRedirect(_organization_url(membership.organization.slug))


@member_may_on(Action.MEMBER_REMOVE, member_or_404)
def member_remove(request: HttpRequest, membership: Membership, member: Membership) -> HttpResponse:
    services.membership_remove(
        membership=member, revoke_their_keys=request.POST.get("revoke_keys") == "on"
    )
    messages.success(request, f"Removed {member.user.email}.")
    return HttpResponseRedirect(_organization_url(membership.organization.slug))


@member_may_on(Action.ORG_TRANSFER, member_or_404)
def ownership_transfer(
    request: HttpRequest, membership: Membership, member: Membership
) -> HttpResponse:
    try:
        services.ownership_transfer(organization=membership.organization, to_membership=member)
    except OrganizationError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{member.user.email} now owns the organisation; you are admin.")
    return HttpResponseRedirect(_organization_url(membership.organization.slug))


@login_required
@require_POST
def organization_leave(request: HttpRequest) -> HttpResponse:
    membership = current_membership(request)
    if not can(membership, Action.ORG_LEAVE):
        messages.error(request, "As the owner, transfer ownership before leaving.")
        return HttpResponseRedirect(_organization_url(membership.organization.slug))
    services.membership_leave(membership=membership)
    request.session.pop(SESSION_KEY, None)
    messages.success(request, f"You left {membership.organization.name}.")
    return HttpResponseRedirect(reverse("dashboard"))


@login_required
@require_http_methods(["GET", "POST"])
def invitation_answer(request: HttpRequest, token: str) -> HttpResponse:
    """The accept link's page: shows the invitation; its buttons accept or decline it."""
    user = request_user(request)
    try:
        invitation = invitation_by_token(token=token)
    except InvitationNotFound:
        raise Http404("no such invitation") from None
    if request.method == "POST":
        try:
            if request.POST.get("answer") == "accept":
                joined = services.invitation_accept(token=token, user=user)
                request.session[SESSION_KEY] = joined.organization.slug
                messages.success(request, f"Welcome to {joined.organization.name}.")
                return HttpResponseRedirect(_dashboard_url(joined.organization.slug))
            services.invitation_decline(token=token, user=user)
            messages.success(request, f"Declined the invitation to {invitation.organization}.")
            return HttpResponseRedirect(reverse("dashboard"))
        except OrganizationError as exc:
            messages.error(request, str(exc))
    invitation.refresh_from_db()
    return render(
        request,
        "portal/invitation.html",
        {
            "invitation": invitation,
            "for_this_user": invitation.email == user.email.lower(),
            "answerable": invitation.state == Invitation.State.PENDING,
        },
        status=400 if request.method == "POST" else 200,
    )


# --- API keys --------------------------------------------------------------------------------


@member_may(Action.KEY_CREATE)
def api_key_create_view(request: HttpRequest, membership: Membership) -> HttpResponse:
    """Create a key and show its secret, this once."""
    organization = membership.organization
    try:
        api_key, secret = services.api_key_create(
            organization=organization,
            name=request.POST.get("name", ""),
            created_by=request_user(request),
        )
    except OrganizationError as exc:
        messages.error(request, str(exc))
        return HttpResponseRedirect(_dashboard_url(organization.slug))
    return _show_secret(request, membership, api_key, secret)


@member_may_on(Action.KEY_MANAGE, api_key_or_404)
def api_key_revoke_view(
    request: HttpRequest, membership: Membership, api_key: ApiKey
) -> HttpResponse:
    services.api_key_revoke(api_key=api_key)
    messages.success(request, f"Revoked {api_key.name} ({api_key.prefix}…).")
    return HttpResponseRedirect(_dashboard_url(membership.organization.slug))


@member_may_on(Action.KEY_MANAGE, api_key_or_404)
def api_key_rename_view(
    request: HttpRequest, membership: Membership, api_key: ApiKey
) -> HttpResponse:
    try:
        services.api_key_rename(api_key=api_key, name=request.POST.get("name", ""))
    except OrganizationError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Renamed the key to {api_key.name}.")
    return HttpResponseRedirect(
        f"{reverse('api_key', args=[api_key.pk])}?org={membership.organization.slug}"
    )


@member_may_on(Action.KEY_MANAGE, api_key_or_404)
def api_key_rotate_view(
    request: HttpRequest, membership: Membership, api_key: ApiKey
) -> HttpResponse:
    """Replace a key with a new one (shown once); the old one works for the overlap."""
    back = f"{reverse('api_key', args=[api_key.pk])}?org={membership.organization.slug}"
    form = ApiKeyRotateForm(request.POST)
    if not form.is_valid():
        messages.error(
            request,
            "The overlap must be a whole number of hours, from 0 to "
            f"{settings.API_KEY_MAX_ROTATION_OVERLAP_HOURS}.",
        )
        return HttpResponseRedirect(back)
    try:
        new_key, secret = services.api_key_rotate(
            api_key=api_key, overlap=timedelta(hours=form.cleaned_data["overlap_hours"])
        )
    except OrganizationError as exc:
        messages.error(request, str(exc))
        return HttpResponseRedirect(back)
    return _show_secret(request, membership, new_key, secret, rotated=api_key)
