from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from billing.money import MoneyError, format_usd, parse_usd
from billing.services import BillingError, credit_grant
from portal.selectors import OrganizationNotFound, organization_get


class Command(BaseCommand):
    help = "Grant AMOUNT US dollars of credit to an organisation (e.g. 25 or 12.50)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("org_slug")
        parser.add_argument("amount", help="US dollars, a decimal number")
        parser.add_argument("--reason", required=True)

    def handle(self, *args: Any, org_slug: str, amount: str, reason: str, **options: Any) -> None:
        try:
            organization = organization_get(slug=org_slug)
            amount_usd = parse_usd(amount)
            entry = credit_grant(organization=organization, amount_usd=amount_usd, reason=reason)
        except (OrganizationNotFound, MoneyError, BillingError) as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"granted {format_usd(amount_usd)} USD (transaction #{entry.pk})")
