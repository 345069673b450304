"""The "Add credit" and "Auto top-up" pages, and the small JSON endpoints their script calls.

Only roles that may pay (`Action.BILLING_MANAGE` in portal.permissions) reach them; others get a
403 page. Credit never comes from here: the page shows the payment pending until the webhook has
granted it.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST

from billing.models import BillingProfile, CardPayment
from billing.money import MoneyError, format_usd, parse_usd
from billing.payments import (
    AutoTopUpTerms,
    PaymentError,
    auto_topup_card_save,
    auto_topup_configure,
    billing_profile_get_or_create,
    card_setup_start,
    membership_may_pay,
    new_request_token,
    topup_amount_parse,
    topup_start,
)
from billing.selectors import wallet_balance_usd
from billing.stripe_api import StripeNotConfigured
from portal.dashboard import current_membership, request_user
from portal.models import Membership


def _paying_membership(request: HttpRequest) -> Membership | None:
    membership = current_membership(request)
    return membership if membership_may_pay(membership=membership) else None


def _forbidden(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "billing/forbidden.html",
        {"reason": "Only the organisation's owners and admins can pay for credit."},
        status=403,
    )


def _stripe_context(request: HttpRequest, membership: Membership) -> dict[str, object] | None:
    """What the card form needs; None (and a message) when payments cannot start."""
    try:
        setup_secret = card_setup_start(organization=membership.organization)
    except (PaymentError, StripeNotConfigured) as error:
        messages.error(request, f"Card payments are unavailable: {error}")
        return None
    return {
        "stripe_js_url": settings.STRIPE_JS_URL,
        "stripe_publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
        "setup_client_secret": setup_secret,
    }


@login_required
@require_GET
def add_credit(request: HttpRequest) -> HttpResponse:
    membership = _paying_membership(request)
    if membership is None:
        return _forbidden(request)
    organization = membership.organization
    context: dict[str, object] = {
        "organization": organization,
        "balance_usd": format_usd(wallet_balance_usd(organization_id=organization.pk)),
        "presets_usd": settings.BILLING_TOPUP_PRESETS_USD,
        "min_usd": settings.BILLING_TOPUP_MIN_USD,
        "max_usd": settings.BILLING_TOPUP_MAX_USD,
        "request_token": new_request_token(),
        "payments": CardPayment.objects.filter(organization=organization).order_by("-created_at")[
            :10
        ],
    }
    stripe_context = _stripe_context(request, membership)
    if stripe_context is not None:
        context |= stripe_context
    return render(request, "billing/add_credit.html", context)


@login_required
@require_POST
def add_credit_pay(request: HttpRequest) -> HttpResponse:
    """Start a top-up with the card the page collected; JSON for the page's script."""
    membership = _paying_membership(request)
    if membership is None:
        return JsonResponse({"error": "only owners and admins can pay"}, status=403)
    try:
        amount_usd = topup_amount_parse(request.POST.get("amount_usd", ""))
        started = topup_start(
            organization=membership.organization,
            user=request_user(request),
            amount_usd=amount_usd,
            setup_intent_id=request.POST.get("setup_intent_id", ""),
            request_token=request.POST.get("request_token", "")[:64] or new_request_token(),
        )
    except (PaymentError, StripeNotConfigured) as error:
        return JsonResponse({"error": str(error)}, status=400)
    return JsonResponse(
        {
            "payment_intent_id": started.payment.stripe_payment_intent_id,
            "client_secret": started.client_secret,
            "status": started.status,
            "status_url": reverse(
                "add_credit_status",
                kwargs={"payment_intent_id": started.payment.stripe_payment_intent_id},
            )
            + f"?org={membership.organization.slug}",
        }
    )


@login_required
@require_GET
def add_credit_status(request: HttpRequest, payment_intent_id: str) -> HttpResponse:
    """A payment of this organisation, and the wallet balance: polled until it is settled."""
    membership = _paying_membership(request)
    if membership is None:
        return JsonResponse({"error": "only owners and admins can pay"}, status=403)
    payment = CardPayment.objects.filter(
        organization_id=membership.organization_id, stripe_payment_intent_id=payment_intent_id
    ).first()
    if payment is None:
        return JsonResponse({"error": "no such payment"}, status=404)
    return JsonResponse(
        {
            "status": payment.status,
            "amount_usd": format_usd(payment.amount_usd),
            "failure_message": payment.failure_message,
            "balance_usd": format_usd(
                wallet_balance_usd(organization_id=membership.organization_id)
            ),
        }
    )


def _auto_topup_url(membership: Membership) -> str:
    return f"{reverse('auto_topup')}?org={membership.organization.slug}"


@login_required
def auto_topup(request: HttpRequest) -> HttpResponse:
    """The auto top-up settings (threshold, amount, on/off) and the card it charges."""
    membership = _paying_membership(request)
    if membership is None:
        return _forbidden(request)
    organization = membership.organization
    if request.method == "POST":
        try:
            terms = AutoTopUpTerms(
                enabled=request.POST.get("enabled") == "on",
                threshold_usd=parse_usd(request.POST.get("threshold_usd", "") or "0"),
                amount_usd=parse_usd(request.POST.get("amount_usd", "") or "0"),
            )
            auto_topup_configure(organization=organization, terms=terms)
        except MoneyError:
            messages.error(request, "Enter amounts in dollars, e.g. 10 or 12.50.")
        except PaymentError as error:
            messages.error(request, str(error))
        else:
            messages.success(request, "Auto top-up saved.")
        return HttpResponseRedirect(_auto_topup_url(membership))
    profile: BillingProfile = billing_profile_get_or_create(organization_id=organization.pk)
    context: dict[str, object] = {
        "organization": organization,
        "profile": profile,
        "threshold_usd": format_usd(profile.auto_topup_threshold_usd),
        "amount_usd": format_usd(profile.auto_topup_amount_usd),
    }
    stripe_context = _stripe_context(request, membership)
    if stripe_context is not None:
        context |= stripe_context
    return render(request, "billing/auto_topup.html", context)


@login_required
@require_POST
def auto_topup_card(request: HttpRequest) -> HttpResponse:
    """Keep the card the page saved with a SetupIntent as the auto top-up card."""
    membership = _paying_membership(request)
    if membership is None:
        return _forbidden(request)
    try:
        profile = auto_topup_card_save(
            organization=membership.organization,
            setup_intent_id=request.POST.get("setup_intent_id", ""),
        )
    except (PaymentError, StripeNotConfigured) as error:
        messages.error(request, str(error))
    else:
        messages.success(request, f"Saved {profile.auto_topup_card_label} for auto top-up.")
    return HttpResponseRedirect(_auto_topup_url(membership))
