from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from portal.services import OrganizationError, organization_provision


class Command(BaseCommand):
    help = (
        "Create an organisation owned by EMAIL (created if new); prints the slug alone. Run "
        "again with the same name and owner, it prints the slug of the one it made."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--owner", required=True, metavar="EMAIL")

    def handle(self, *args: Any, name: str, owner: str, **options: Any) -> None:
        try:
            organization, created = organization_provision(name=name, owner_email=owner)
        except OrganizationError as exc:
            raise CommandError(str(exc)) from None
        if not created:
            self.stderr.write(f"{organization.slug} already exists, owned by {owner}")
        self.stdout.write(organization.slug)
