"""Stripe's webhook endpoint: verify, store by event id, hand the work to Celery, answer fast."""

from __future__ import annotations

import json

from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from billing import stripe_api
from billing.payments import stripe_event_record
from billing.tasks import process_stripe_event


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> HttpResponse:
    """400 with no side effect unless the signature is good; 200 once the event is stored."""
    try:
        event = stripe_api.webhook_event_verified(
            payload=request.body, signature_header=request.headers.get("Stripe-Signature")
        )
    except stripe_api.WebhookSignatureInvalid as error:
        return JsonResponse({"error": str(error)}, status=400)
    except json.JSONDecodeError:
        return JsonResponse({"error": "not JSON"}, status=400)
    stored = stripe_event_record(event=event)
    if stored is None:
        return JsonResponse({"received": True, "handled": False})
    if stored.processed_at is None:
        # A redelivery of an event not yet applied is queued again; the task is idempotent.
        event_id = stored.event_id
        transaction.on_commit(lambda: process_stripe_event.delay(event_id))
    return JsonResponse({"received": True, "handled": True})
