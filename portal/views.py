from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST

from portal.dashboard import current_membership, request_user
from portal.selectors import ApiKeyNotFound, api_key_get_manageable
from portal.services import OrganizationError, api_key_create, api_key_revoke


def home(request: HttpRequest) -> HttpResponse:
    return render(request, "portal/home.html", {"api_base_url": request.build_absolute_uri("/v1")})


def _dashboard_url(organization_slug: str) -> str:
    # The dashboard page itself belongs to billing (it shows the balance); only its name is used.
    return f"{reverse('dashboard')}?org={organization_slug}"


@login_required
@require_POST
def api_key_create_view(request: HttpRequest) -> HttpResponse:
    """Create a key and show its secret, this once: the page is not stored or redirected to."""
    membership = current_membership(request)
    organization = membership.organization
    try:
        api_key, secret = api_key_create(
            organization=organization,
            name=request.POST.get("name", ""),
            created_by=request_user(request),
        )
    except OrganizationError as exc:
        messages.error(request, str(exc))
        return HttpResponseRedirect(_dashboard_url(organization.slug))
    response = render(
        request,
        "portal/api_key_created.html",
        {"organization": organization, "api_key": api_key, "secret": secret},
    )
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def api_key_revoke_view(request: HttpRequest, api_key_id: int) -> HttpResponse:
    membership = current_membership(request)
    try:
        api_key = api_key_get_manageable(membership=membership, api_key_id=api_key_id)
    except ApiKeyNotFound:
        raise Http404("no such API key") from None
    api_key_revoke(api_key=api_key)
    messages.success(request, f"Revoked {api_key.name} ({api_key.prefix}…).")
    return HttpResponseRedirect(_dashboard_url(membership.organization.slug))
