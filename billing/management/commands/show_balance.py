from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from billing.money import format_usd
from billing.selectors import wallet_balance_usd
from portal.selectors import OrganizationNotFound, organization_get


class Command(BaseCommand):
    help = "Print the organisation's wallet balance alone, in US dollars."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("org_slug")

    def handle(self, *args: Any, org_slug: str, **options: Any) -> None:
        try:
            organization = organization_get(slug=org_slug)
        except OrganizationNotFound as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(format_usd(wallet_balance_usd(organization_id=organization.pk)))
