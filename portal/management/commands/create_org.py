from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from portal.services import OrganizationError, organization_create


class Command(BaseCommand):
    help = "Create an organisation owned by EMAIL (created if new); prints the slug alone."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--owner", required=True, metavar="EMAIL")

    def handle(self, *args: Any, name: str, owner: str, **options: Any) -> None:
        try:
            organization = organization_create(name=name, owner_email=owner)
        except OrganizationError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(organization.slug)
