"""The management API's statements (list, detail, CSV, PDF) and a key's spend cap.

Alice owns Acme, Adam is an admin of it, Bob and Mallory are plain members; Charlie owns Rival.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from billing.models import LedgerTransaction, SpendCap, UsageRecord
from billing.services import spend_cap_set
from billing.statements import statement_issue
from portal.services import api_key_create
from tests.factories import make_usage
from tests.portal.api_helpers import as_token, as_user, token_for

OCTOBER_5 = datetime(2026, 10, 5, tzinfo=UTC)


def org_url(slug: str, tail: str) -> str:
    return f"/api/v1/organizations/{slug}/{tail}"


@pytest.fixture
def statements(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    make_usage(key)
    # Move the credit grants and the usage into October (the services stamp the present).
    LedgerTransaction.objects.update(created_at=OCTOBER_5)
    UsageRecord.objects.update(created_at=OCTOBER_5)
    october = statement_issue(organization_id=team.acme.pk, period_start=date(2026, 10, 1))
    september = statement_issue(organization_id=team.acme.pk, period_start=date(2026, 9, 1))
    rivals = statement_issue(organization_id=team.rival.pk, period_start=date(2026, 10, 1))
    return october, september, rivals


def test_statements_are_listed_newest_first_and_only_the_organisations_own(team, statements):
    october, september, _ = statements

    response = as_user(team.bob).get(org_url(team.acme.slug, "statements/"))

    assert response.status_code == 200
    assert [s["id"] for s in response.json()] == [october.pk, september.pk]
    assert response.json()[0]["period_start"] == "2026-10-01"


def test_a_statement_shows_its_exact_figures(team, statements):
    october, _, _ = statements

    body = as_user(team.bob).get(org_url(team.acme.slug, f"statements/{october.pk}/")).json()

    assert Decimal(body["opening_balance_usd"]) == october.opening_balance_usd
    assert Decimal(body["closing_balance_usd"]) == october.closing_balance_usd
    opening = Decimal(body["opening_balance_usd"])
    moved = sum(Decimal(m["amount_usd"]) for m in body["movements"])
    assert opening + moved == Decimal(body["closing_balance_usd"])
    assert [(line["model"], line["requests"]) for line in body["usage_lines"]] == [
        ("fake-small", 1)
    ]


def test_a_statement_downloads_as_csv_and_pdf(team, statements):
    october, _, _ = statements
    client = as_token(token_for(team.alice, team.acme, "member"))

    csv = client.get(org_url(team.acme.slug, f"statements/{october.pk}/csv/"))
    pdf = client.get(org_url(team.acme.slug, f"statements/{october.pk}/pdf/"))

    assert (csv.status_code, csv["Content-Type"]) == (200, "text/csv")
    assert "attachment" in csv["Content-Disposition"]
    assert "fake-small" in csv.content.decode()
    assert (pdf.status_code, pdf["Content-Type"]) == (200, "application/pdf")
    assert pdf.content.startswith(b"%PDF")


def test_another_organisations_statement_is_a_404(team, statements):
    _, _, rivals = statements

    for tail in ("", "csv/", "pdf/"):
        response = as_user(team.alice).get(
            org_url(team.acme.slug, f"statements/{rivals.pk}/{tail}")
        )
        assert response.status_code == 404, tail


def test_an_admin_sets_a_keys_spend_cap_exactly(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)

    response = as_user(team.adam).put(
        org_url(team.acme.slug, f"keys/{key.pk}/spend-cap/"),
        {"amount_usd": "2.5000000001", "window": "day"},
        format="json",
    )

    assert response.status_code == 200
    assert response.json()["spend_cap"]["window"] == "day"
    cap = SpendCap.objects.get(api_key=key)
    assert (cap.amount_usd, cap.window) == (Decimal("2.5000000001"), "day")


def test_a_float_like_or_negative_cap_is_a_400(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    url = org_url(team.acme.slug, f"keys/{key.pk}/spend-cap/")

    for amount in ("-1", "abc", "1.123456789012345"):
        response = as_user(team.adam).put(url, {"amount_usd": amount}, format="json")
        assert response.status_code == 400, amount
    assert not SpendCap.objects.exists()


def test_a_cap_sent_as_a_json_number_with_a_fraction_is_a_400_not_rounded_through_a_float(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    url = org_url(team.acme.slug, f"keys/{key.pk}/spend-cap/")

    # 19 significant digits: a float keeps 17, so this would become 123456789.01234567.
    response = as_user(team.adam).put(
        url, '{"amount_usd": 123456789.0123456789}', content_type="application/json"
    )

    assert response.status_code == 400
    assert "decimal string" in response.json()["amount_usd"][0]
    assert not SpendCap.objects.exists()


def test_a_cap_sent_as_a_json_integer_is_exact(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    url = org_url(team.acme.slug, f"keys/{key.pk}/spend-cap/")

    response = as_user(team.adam).put(url, '{"amount_usd": 25}', content_type="application/json")

    assert response.status_code == 200
    assert SpendCap.objects.get(api_key=key).amount_usd == Decimal(25)


def test_removing_the_cap_lets_the_key_spend_the_wallet(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    spend_cap_set(api_key=key, amount_usd=Decimal("1"), window=SpendCap.Window.MONTH)

    response = as_user(team.alice).delete(org_url(team.acme.slug, f"keys/{key.pk}/spend-cap/"))

    assert response.status_code == 200
    assert response.json()["spend_cap"] is None
    assert not SpendCap.objects.filter(api_key=key).exists()


def test_a_member_reads_their_own_keys_cap_and_spend_but_cannot_change_it(team):
    key, _ = api_key_create(organization=team.acme, name="k", created_by=team.bob)
    spend_cap_set(api_key=key, amount_usd=Decimal("1"), window=SpendCap.Window.MONTH)
    make_usage(key)
    url = org_url(team.acme.slug, f"keys/{key.pk}/spend-cap/")

    read = as_user(team.bob).get(url)
    put = as_user(team.bob).put(url, {"amount_usd": "100"}, format="json")

    assert read.status_code == 200
    assert Decimal(read.json()["spent_total_usd"]) > 0
    assert read.json()["spent_in_window_usd"] is not None  # the key has a cap: a window
    assert put.status_code == 403
    assert SpendCap.objects.get(api_key=key).amount_usd == Decimal("1")
