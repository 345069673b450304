"""The statements pages: tenant-scoped, with CSV and PDF downloads."""

from __future__ import annotations

import csv
import io
import re
import zlib
from decimal import Decimal

import pytest

from billing.models import BillingAlertSettings, Statement
from billing.statements import statement_issue
from portal.models import Membership, User
from tests.billing.test_statements import OCTOBER, busy_org, card_org, make_old_org  # noqa: F401
from tests.factories import make_org

pytestmark = pytest.mark.django_db


def owner_of(organization) -> User:
    return Membership.objects.get(organization=organization, role=Membership.Role.OWNER).user


@pytest.fixture
def statement(busy_org) -> Statement:  # noqa: F811
    return statement_issue(organization_id=busy_org.pk, period_start=OCTOBER)


def test_it_lists_and_shows_the_organisations_statements(client, statement):
    client.force_login(owner_of(statement.organization))

    listing = client.get("/dashboard/statements/")
    detail = client.get(f"/dashboard/statements/{statement.pk}/")

    assert listing.status_code == 200
    assert f"/dashboard/statements/{statement.pk}/" in listing.text
    assert "October 2026" in listing.text
    assert detail.status_code == 200
    assert "Top-ups" in detail.text
    assert "fake-large" in detail.text
    assert "20.0000000000" in detail.text  # full scale, never 2E+1


def test_the_csv_adds_up_to_the_closing_balance(client, statement):
    client.force_login(owner_of(statement.organization))

    response = client.get(f"/dashboard/statements/{statement.pk}.csv")

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv"
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.content.decode())))
    summary = rows[rows.index(["line", "transactions", "amount_usd"]) + 1 :]
    summary = summary[: summary.index([])]
    assert summary[0][0] == "Opening balance"
    assert summary[-1][0] == "Closing balance"
    total = sum((Decimal(row[2]) for row in summary[:-1]), Decimal(0))
    assert total == Decimal(summary[-1][2]) == statement.closing_balance_usd
    usage = rows[
        rows.index(
            [
                "model",
                "requests",
                "input_tokens",
                "output_tokens",
                "cached_input_tokens",
                "cost_usd",
            ]
        )
        + 1 :
    ]
    assert [row[0] for row in usage] == ["fake-large", "fake-small"]


def test_the_pdf_is_a_pdf(client, statement):
    client.force_login(owner_of(statement.organization))

    response = client.get(f"/dashboard/statements/{statement.pk}.pdf")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert response.content.startswith(b"%PDF")
    assert response.content.rstrip().endswith(b"%%EOF")


@pytest.mark.parametrize("suffix", ["/", ".csv", ".pdf"])
def test_another_organisations_member_gets_404(client, statement, suffix):
    other = make_org(name="Other")
    client.force_login(owner_of(other))

    assert client.get(f"/dashboard/statements/{statement.pk}{suffix}").status_code == 404
    # Naming the statement's organisation does not help a non-member either.
    asked = client.get(
        f"/dashboard/statements/{statement.pk}{suffix}?org={statement.organization.slug}"
    )
    assert asked.status_code == 404
    assert f"/dashboard/statements/{statement.pk}/" not in client.get("/dashboard/statements/").text


def test_a_member_of_two_organisations_sees_each_statement_under_its_organisation(
    client, statement
):
    other = make_old_org("Second")
    user = owner_of(statement.organization)
    Membership.objects.create(organization=other, user=user, role=Membership.Role.MEMBER)
    client.force_login(user)

    under_other = client.get(f"/dashboard/statements/{statement.pk}/?org={other.slug}")
    under_own = client.get(
        f"/dashboard/statements/{statement.pk}/?org={statement.organization.slug}"
    )

    assert (under_other.status_code, under_own.status_code) == (404, 200)


def test_the_dashboard_links_to_the_statements(client, statement):
    client.force_login(owner_of(statement.organization))

    assert "/dashboard/statements/" in client.get("/dashboard/").text


def test_an_owner_sets_the_billing_email_and_threshold(client):
    org = make_org(name="Settings")
    client.force_login(owner_of(org))

    response = client.post(
        "/dashboard/statements/alerts",
        {"org": org.slug, "billing_email": "ap@example.com", "low_balance_threshold": "12.5"},
    )

    assert response.status_code == 302
    saved = BillingAlertSettings.objects.get(organization=org)
    assert (saved.billing_email, saved.low_balance_threshold_usd) == (
        "ap@example.com",
        Decimal("12.5"),
    )
    page = client.get(response["Location"]).text
    assert "Billing alert settings saved." in page
    assert 'value="12.5000000000"' in page


@pytest.mark.parametrize(
    ("email", "threshold", "error"),
    [
        ("not-an-address", "", "not an e-mail address"),
        ("", "0.1.2", "not a decimal amount"),
        ("", "-1", "cannot be negative"),
    ],
)
def test_bad_billing_settings_are_refused_with_a_message(client, email, threshold, error):
    org = make_org(name="Settings")
    client.force_login(owner_of(org))

    response = client.post(
        "/dashboard/statements/alerts",
        {"org": org.slug, "billing_email": email, "low_balance_threshold": threshold},
        follow=True,
    )

    assert error in response.text
    assert not BillingAlertSettings.objects.filter(organization=org).exists()


def test_a_plain_member_cannot_change_billing_settings(client):
    org = make_org(name="Settings")
    member = User.objects.create_user(email="member@example.com", password=None)
    Membership.objects.create(organization=org, user=member, role=Membership.Role.MEMBER)
    client.force_login(member)

    response = client.post(
        "/dashboard/statements/alerts",
        {"org": org.slug, "billing_email": "evil@example.com", "low_balance_threshold": ""},
    )

    assert response.status_code == 403
    assert not BillingAlertSettings.objects.filter(organization=org).exists()
    assert "Owners and admins can change them" in client.get("/dashboard/statements/").text


CARD_LINES = ["Top-ups", "Refunds", "Disputed payments", "Disputes won (reinstated)"]


def pdf_text(content: bytes) -> str:
    """The text drawn by a PDF's (Flate-compressed) content streams, good enough to search."""
    drawn = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", content, re.DOTALL):
        try:
            drawn.append(zlib.decompress(stream).decode("latin-1"))
        except zlib.error:
            drawn.append(stream.decode("latin-1"))
    return "\n".join(drawn)


def test_page_csv_and_pdf_show_each_card_movement_on_its_own_line(client, card_org):  # noqa: F811
    statement = statement_issue(organization_id=card_org.pk, period_start=OCTOBER)
    client.force_login(owner_of(card_org))

    page = client.get(f"/dashboard/statements/{statement.pk}/").text
    rows = list(
        csv.reader(io.StringIO(client.get(f"/dashboard/statements/{statement.pk}.csv").text))
    )
    pdf = pdf_text(client.get(f"/dashboard/statements/{statement.pk}.pdf").content)

    for label in CARD_LINES:
        assert f'<th scope="row">{label}</th>' in page
        escaped = label.replace("(", "\\(").replace(")", "\\)")  # as a PDF string escapes
        assert f"({escaped}) Tj" in pdf
    assert [row for row in rows if row and row[0] in CARD_LINES] == [
        ["Top-ups", "1", "100.0000000000"],
        ["Refunds", "2", "-50.0000000000"],
        ["Disputed payments", "1", "-30.0000000000"],
        ["Disputes won (reinstated)", "1", "30.0000000000"],
    ]


def test_the_list_page_has_one_settings_form_and_a_plain_title(client, statement):
    client.force_login(owner_of(statement.organization))

    page = client.get("/dashboard/statements/").text

    title = page[page.index("<title>") : page.index("</title>")]
    assert "<" not in title[len("<title>") :]
    assert page.count('id="billing-email"') == 1
