from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from billing.money import MoneyError, format_usd, parse_usd
from billing.services import BillingError, credit_grant, credit_grant_once
from portal.selectors import OrganizationNotFound, organization_get


class Command(BaseCommand):
    help = "Grant AMOUNT US dollars of credit to an organisation (e.g. 25 or 12.50)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("org_slug")
        parser.add_argument("amount", help="US dollars, a decimal number")
        parser.add_argument("--reason", required=True)
        parser.add_argument(
            "--reference",
            help="grant at most once per organisation under this reference: run again, it "
            "grants nothing and names the first grant",
        )

    def handle(
        self,
        *args: Any,
        org_slug: str,
        amount: str,
        reason: str,
        reference: str | None,
        **options: Any,
    ) -> None:
        try:
            organization = organization_get(slug=org_slug)
            amount_usd = parse_usd(amount)
            if reference is None:
                entry = credit_grant(
                    organization=organization, amount_usd=amount_usd, reason=reason
                )
                granted_now = True
            else:
                entry, granted_now = credit_grant_once(
                    organization=organization,
                    amount_usd=amount_usd,
                    reason=reason,
                    reference=reference,
                )
        except (OrganizationNotFound, MoneyError, BillingError) as exc:
            raise CommandError(str(exc)) from None
        if granted_now:
            self.stderr.write(f"granted {format_usd(amount_usd)} USD (transaction #{entry.pk})")
        else:
            self.stderr.write(
                f"already granted {format_usd(amount_usd)} USD under reference "
                f"{reference!r} (transaction #{entry.pk}); nothing granted now"
            )
