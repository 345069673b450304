"""Prepare a fresh database for the benchmark: migrate, a catalog routed to the fake upstream,
an organisation with credit and a key with every limit set. Prints the key.

Run with DATABASE_URL and REDIS_URL pointing at the benchmark's throwaway services:
    python -m bench.switchboard_setup http://127.0.0.1:9100/v1
"""

from __future__ import annotations

import os
import sys

import django


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
    django.setup()
    from django.core.management import call_command

    from billing.models import SpendCap
    from billing.money import parse_usd
    from billing.services import credit_grant
    from gateway.services import catalog_load
    from portal.services import api_key_create, organization_create

    upstream = sys.argv[1]
    call_command("migrate", verbosity=0, interactive=False)
    catalog_load(
        data={
            "providers": [{"name": "bench", "kind": "openai", "base_url": upstream}],
            "models": [
                {
                    "name": "fake-small",
                    "routes": [{"provider": "bench", "upstream_model": "fake-small"}],
                    "price": {"input": "0.50", "output": "1.50"},
                    "max_output_tokens": 4096,
                }
            ],
        }
    )
    organization = organization_create(name="Bench", owner_email="bench@example.com")
    credit_grant(organization=organization, amount_usd=parse_usd("1000000"), reason="bench")
    # Another organisation's traffic elsewhere in the ledger, as on a real installation.
    other = organization_create(name="Other", owner_email="other@example.com")
    credit_grant(organization=other, amount_usd=parse_usd("10"), reason="bench")
    key, secret = api_key_create(organization=organization, name="bench")
    # Every limit on, set high enough never to refuse: the benchmark pays for checking them.
    key.requests_per_minute = 100_000_000
    key.tokens_per_minute = 1_000_000_000
    key.max_concurrent_requests = 10_000
    key.save()
    SpendCap.objects.create(
        api_key=key, amount_usd=parse_usd("1000000"), window=SpendCap.Window.MONTH
    )
    sys.stdout.write(secret + "\n")


if __name__ == "__main__":
    main()
