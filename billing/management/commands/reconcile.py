from argparse import ArgumentParser
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from billing.selectors import ledger_violations

# A bound far beyond any sweeper setting that still leaves `now - bound` a valid datetime.
MAX_HELD_SECONDS = 100 * 365 * 24 * 3600


class Command(BaseCommand):
    help = "Check every money invariant; print each violation and exit non-zero if any."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--held-longer-than",
            type=int,
            default=settings.BILLING_RESERVATION_SWEEP_AFTER_SECONDS * 2,
            metavar="SECONDS",
            help="report reservations held longer than this (default: twice the sweep bound)",
        )

    def handle(self, *args: Any, held_longer_than: int, **options: Any) -> None:
        if held_longer_than < 0:
            raise CommandError("--held-longer-than must be 0 or more seconds")
        if held_longer_than > MAX_HELD_SECONDS:
            raise CommandError(f"--held-longer-than is at most {MAX_HELD_SECONDS} seconds")
        violations = ledger_violations(held_longer_than=timedelta(seconds=held_longer_than))
        for violation in violations:
            self.stdout.write(violation)
        if violations:
            raise CommandError(f"{len(violations)} violation(s)")
        self.stdout.write("ledger clean")
