"""Billing's pages. The dashboard lives here because it shows the wallet balance, which
portal (the layer below) cannot read; the keys on it are portal's, reached through its
selectors, and created and revoked by portal's views."""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from billing.money import format_usd
from billing.selectors import wallet_balance_usd
from portal.dashboard import current_membership, request_user
from portal.selectors import api_keys_manageable, membership_manages_all_keys, memberships_of_user


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """The current organisation: its balance and the API keys this member manages."""
    memberships = memberships_of_user(user=request_user(request))
    if not memberships.exists() and not request.GET.get("org"):
        # An operator made with createsuperuser, or a member removed from every organisation.
        return render(request, "billing/no_organization.html")
    membership = current_membership(request)
    organization = membership.organization
    return render(
        request,
        "billing/dashboard.html",
        {
            "membership": membership,
            "organization": organization,
            "memberships": memberships,
            "balance_usd": format_usd(wallet_balance_usd(organization_id=organization.pk)),
            "api_keys": api_keys_manageable(membership=membership),
            "manages_all_keys": membership_manages_all_keys(membership=membership),
        },
    )
