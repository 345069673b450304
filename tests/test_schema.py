"""The database schema is what the models and migrations say, and no more."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection


@pytest.mark.django_db
def test_it_has_a_migration_for_every_model_change() -> None:
    # makemigrations --check exits non-zero when a model differs from its migrations.
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


@pytest.mark.django_db
def test_it_keeps_no_unused_index_on_the_request_path_tables() -> None:
    # Every request writes a reservation and a usage record: each index on them is paid for
    # on every request. `unique=True` on their request id would add a `_like` index (for LIKE
    # 'prefix%', which nothing runs), and a foreign key its own index even where a composite
    # one covers it (migration billing 0013).
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tablename, indexdef FROM pg_indexes"
            " WHERE tablename IN ('billing_reservation', 'billing_usagerecord')"
        )
        definitions = cursor.fetchall()
    columns = sorted(
        (table, definition.split(" USING btree ", 1)[1]) for table, definition in definitions
    )
    assert columns == [
        ("billing_reservation", "(api_key_id)"),
        ("billing_reservation", "(created_at) WHERE ((state)::text = 'held'::text)"),
        ("billing_reservation", "(id)"),
        ("billing_reservation", "(organization_id)"),
        ("billing_reservation", "(request_id)"),
        ("billing_usagerecord", "(api_key_id)"),
        ("billing_usagerecord", "(created_at)"),
        ("billing_usagerecord", "(id)"),
        ("billing_usagerecord", "(ledger_transaction_id)"),
        ("billing_usagerecord", "(organization_id, created_at)"),
        ("billing_usagerecord", "(request_id)"),
    ]
