"""The statements pages: a list, a statement, and its CSV and PDF downloads.

Every statement is fetched through the member's organisation: another organisation's
statement is a 404, the same answer as one that does not exist.
"""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render

from billing.models import Statement
from billing.statements import (
    statement_csv,
    statement_figures,
    statement_filename,
    statement_get,
    statement_pdf,
    statements_of_organization,
)
from portal.dashboard import current_membership


def _statement_of_member(request: HttpRequest, statement_id: int) -> Statement:
    membership = current_membership(request)
    statement = statement_get(organization_id=membership.organization_id, statement_id=statement_id)
    if statement is None:
        raise Http404("no such statement")
    return statement


@login_required
def statement_list(request: HttpRequest) -> HttpResponse:
    membership = current_membership(request)
    return render(
        request,
        "billing/statement_list.html",
        {
            "organization": membership.organization,
            "statements": statements_of_organization(organization_id=membership.organization_id),
        },
    )


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
