from typing import Any

from django.core.management.base import BaseCommand, CommandError

from billing.settlement_spool import spooled_settlements_replay


class Command(BaseCommand):
    help = (
        "Settle the requests spooled while the database was down (the Redis list and this "
        "host's spool files); safe to run at any time, and again."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        outcome = spooled_settlements_replay()
        self.stdout.write(f"settled {outcome.settled}, set aside {outcome.dead}")
        if outcome.remaining:
            raise CommandError("entries remain: the database or Redis is still unavailable")
