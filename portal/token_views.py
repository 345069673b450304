"""The dashboard's management token page: owners and admins create (the secret shown once),
list and revoke the tokens scripts use to call the management API."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse

from portal.dashboard import current_membership, member_may_on
from portal.management_tokens import (
    management_token_create,
    management_token_get,
    management_token_revoke,
    management_tokens_of,
)
from portal.models import ManagementToken, Membership
from portal.permissions import Action, can
from portal.services import OrganizationError


def _token_manager(request: HttpRequest) -> Membership:
    membership = current_membership(request)
    if not can(membership, Action.TOKEN_MANAGE):
        raise PermissionDenied("Only owners and admins manage management tokens.")
    return membership


def _page_url(membership: Membership) -> str:
    return f"{reverse('management_tokens')}?org={membership.organization.slug}"


@login_required
def management_tokens_page(request: HttpRequest) -> HttpResponse:
    membership = _token_manager(request)
    if request.method == "POST":
        try:
            token, secret = management_token_create(
                membership=membership,
                name=request.POST.get("name", ""),
                role=request.POST.get("role", Membership.Role.MEMBER),
            )
        except OrganizationError as exc:
            messages.error(request, str(exc))
            return HttpResponseRedirect(_page_url(membership))
        response = render(
            request,
            "portal/management_token_created.html",
            {"organization": membership.organization, "token": token, "secret": secret},
        )
        response["Cache-Control"] = "no-store"
        return response
    return render(
        request,
        "portal/management_tokens.html",
        {
            "organization": membership.organization,
            "membership": membership,
            "tokens": management_tokens_of(organization=membership.organization),
            "roles": Membership.Role.choices,
        },
    )


def _token_or_404(membership: Membership, token_id: int) -> ManagementToken:
    token = management_token_get(organization=membership.organization, token_id=token_id)
    if token is None:
        raise Http404("no such management token")
    return token


@member_may_on(Action.TOKEN_MANAGE, _token_or_404)
def management_token_revoke_view(
    request: HttpRequest, membership: Membership, token: ManagementToken
) -> HttpResponse:
    management_token_revoke(token=token)
    messages.success(request, f"Revoked {token.name} ({token.prefix}…).")
    return HttpResponseRedirect(_page_url(membership))
