from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from billing.money import parse_usd
from billing.services import credit_grant
from portal.models import Organization
from portal.services import api_key_create, organization_create

DEMO_SLUG = "demo"
DEMO_CREDIT_USD = parse_usd("10")


class Command(BaseCommand):
    help = (
        "For `make run`: ensure a demo organisation with $10 of credit exists and print a new "
        "API key for it (keys are shown once, so each run makes a fresh one)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            organization = Organization.objects.filter(slug=DEMO_SLUG).first()
            if organization is None:
                organization = organization_create(name="Demo", owner_email="demo@example.com")
                credit_grant(
                    organization=organization, amount_usd=DEMO_CREDIT_USD, reason="demo credit"
                )
            _, secret = api_key_create(organization=organization, name="make run")
        self.stdout.write(secret)
