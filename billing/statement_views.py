"""The statements pages: a list, a statement, and its CSV and PDF downloads.

Every statement is fetched through the member's organisation: another organisation's
statement is a 404, the same answer as one that does not exist.
"""

from __future__ import annotations

from urllib.parse import quote

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from billing.alerts import (
    AlertSettingsError,
    billing_alert_settings_get,
    billing_alert_settings_update,
)
from billing.models import Statement
from billing.money import format_usd
from billing.statements import (
    statement_csv,
    statement_figures,
    statement_filename,
    statement_get,
    statement_pdf,
    statements_of_organization,
)
from portal.dashboard import current_membership
from portal.permissions import Action, can, require


def _statement_of_member(request: HttpRequest, statement_id: int) -> Statement:
    membership = current_membership(request)
    statement = statement_get(organization_id=membership.organization_id, statement_id=statement_id)
    if statement is None:
        raise Http404("no such statement")
    return statement


@login_required
def statement_list(request: HttpRequest) -> HttpResponse:
    """The organisation's statements, and (for owners and admins) where billing mail goes."""
    membership = current_membership(request)
    return render(
        request,
        "billing/statement_list.html",
        {
            "organization": membership.organization,
            "statements": statements_of_organization(organization_id=membership.organization_id),
            "manages_billing": can(membership, Action.BILLING_MANAGE),
            "alert_settings": billing_alert_settings_get(
                organization_id=membership.organization_id
            ),
            "default_threshold_usd": format_usd(settings.BILLING_LOW_BALANCE_THRESHOLD_USD),
        },
    )


@login_required
@require_POST
def billing_alert_settings_view(request: HttpRequest) -> HttpResponse:
    """Save the billing e-mail and low-balance threshold (owners and admins)."""
    membership = current_membership(request)
    require(membership, Action.BILLING_MANAGE)
    try:
        billing_alert_settings_update(
            organization_id=membership.organization_id,
            billing_email=request.POST.get("billing_email", ""),
            low_balance_threshold=request.POST.get("low_balance_threshold", ""),
        )
    except AlertSettingsError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Billing alert settings saved.")
    slug = quote(membership.organization.slug)
    return redirect(f"{reverse('statement_list')}?org={slug}")


@login_required
def statement_detail(request: HttpRequest, statement_id: int) -> HttpResponse:
    statement = _statement_of_member(request, statement_id)
    return render(
        request,
        "billing/statement_detail.html",
        {
            "organization": statement.organization,
            "statement": statement,
            "figures": statement_figures(statement=statement),
        },
    )


@login_required
def statement_csv_download(request: HttpRequest, statement_id: int) -> HttpResponse:
    statement = _statement_of_member(request, statement_id)
    response = HttpResponse(statement_csv(statement=statement), content_type="text/csv")
    filename = statement_filename(statement=statement, ext="csv")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@login_required
def statement_pdf_download(request: HttpRequest, statement_id: int) -> HttpResponse:
    statement = _statement_of_member(request, statement_id)
    response = HttpResponse(statement_pdf(statement=statement), content_type="application/pdf")
    filename = statement_filename(statement=statement, ext="pdf")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
