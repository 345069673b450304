from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from portal.selectors import OrganizationNotFound, organization_get
from portal.services import OrganizationError, api_key_create


class Command(BaseCommand):
    help = "Create an API key for the organisation; prints the key alone (it is shown only once)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("org_slug")
        parser.add_argument("--name", required=True)

    def handle(self, *args: Any, org_slug: str, name: str, **options: Any) -> None:
        try:
            organization = organization_get(slug=org_slug)
            _, secret = api_key_create(organization=organization, name=name)
        except (OrganizationNotFound, OrganizationError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(secret)
