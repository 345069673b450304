"""One API key's page. It is billing's because it shows the key's spend and edits its spend
cap (money, which portal, the layer below, cannot read); the rest of the key (name, limits,
rotation, revocation) is portal's, reached through portal's selectors, forms and services, and
every action is checked by portal.permissions."""

from __future__ import annotations

from decimal import Decimal

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db import transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from billing.models import SpendCap
from billing.money import MoneyError, format_usd, parse_usd
from billing.selectors import api_key_spend
from billing.services import BillingError, spend_cap_set
from portal.dashboard import api_key_or_404, current_membership
from portal.forms import ApiKeyLimitsForm, ApiKeyRotateForm
from portal.permissions import Action, can, require
from portal.services import OrganizationError, api_key_limits_update


class SpendCapForm(forms.Form):
    spend_cap_usd = forms.CharField(
        required=False, label="Spend cap (USD)", help_text="Empty: no cap."
    )
    spend_cap_window = forms.ChoiceField(choices=SpendCap.Window.choices, label="Per")

    def clean_spend_cap_usd(self) -> Decimal | None:
        raw = self.cleaned_data["spend_cap_usd"].strip()
        if not raw:
            return None
        try:
            return parse_usd(raw)
        except MoneyError as exc:
            raise forms.ValidationError(str(exc)) from None


@login_required
@require_http_methods(["GET", "POST"])
def api_key_detail(request: HttpRequest, api_key_id: int) -> HttpResponse:
    """The key, its spend so far, and (for admins and owners) its limits and spend cap."""
    membership = current_membership(request)
    api_key = api_key_or_404(membership, api_key_id)
    cap = SpendCap.objects.filter(api_key=api_key).first()
    cap_initial = {
        "spend_cap_usd": format_usd(cap.amount_usd) if cap else "",
        "spend_cap_window": cap.window if cap else SpendCap.Window.MONTH,
    }
    limits_form = ApiKeyLimitsForm(initial=ApiKeyLimitsForm.initial_for(api_key))
    cap_form = SpendCapForm(initial=cap_initial)
    status = 200
    if request.method == "POST":
        require(membership, Action.KEY_EDIT_LIMITS, api_key)
        limits_form = ApiKeyLimitsForm(request.POST)
        cap_form = SpendCapForm(request.POST)
        if limits_form.is_valid() and cap_form.is_valid():
            try:
                with transaction.atomic():
                    api_key_limits_update(api_key=api_key, **limits_form.cleaned_data)
                    spend_cap_set(
                        api_key=api_key,
                        amount_usd=cap_form.cleaned_data["spend_cap_usd"],
                        window=SpendCap.Window(cap_form.cleaned_data["spend_cap_window"]),
                    )
            except (OrganizationError, BillingError) as exc:
                messages.error(request, str(exc))
            else:
                messages.success(request, f"Saved the limits of {api_key.name}.")
                return HttpResponseRedirect(
                    f"{reverse('api_key', args=[api_key.pk])}?org={membership.organization.slug}"
                )
        status = 400
    spend = api_key_spend(api_key_id=api_key.pk)
    return render(
        request,
        "billing/api_key.html",
        {
            "membership": membership,
            "organization": membership.organization,
            "api_key": api_key,
            "cap": cap,
            "spend_total_usd": format_usd(spend.total_usd),
            "spend_window_usd": (
                format_usd(spend.window_spent_usd) if spend.window_spent_usd is not None else None
            ),
            "limits_form": limits_form,
            "cap_form": cap_form,
            "rotate_form": ApiKeyRotateForm(),
            "can_manage": can(membership, Action.KEY_MANAGE, api_key),
            "can_edit_limits": can(membership, Action.KEY_EDIT_LIMITS, api_key),
            "now": timezone.now(),
        },
        status=status,
    )
