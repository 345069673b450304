"""The operator CLI, run as real processes against the test database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import openai
import pytest
from asgiref.sync import async_to_sync
from openai.types.chat import ChatCompletionMessageParam

from billing.money import usage_cost_usd
from gateway.selectors import catalog_model
from tests.fakes.provider import count_prompt_tokens, reply_for
from tests.servers import child_database_url

REPO = Path(__file__).resolve().parents[1]


def manage_started(*args: str) -> subprocess.Popen[str]:
    """`manage.py ARGS` started as a child process against the test database."""
    return subprocess.Popen(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env={**os.environ, "DATABASE_URL": child_database_url()},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def manage(*args: str) -> subprocess.CompletedProcess[str]:
    return finished(manage_started(*args))


def ok(*args: str) -> str:
    result = manage(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_round_trip_leaves_the_exact_remainder(gateway_url, catalog, fake_provider):
    slug = ok("create_org", "Acme Research", "--owner", "ops@acme.test")
    assert slug == "acme-research"
    ok("grant_credits", slug, "20.00", "--reason", "welcome credit")
    key = ok("create_api_key", slug, "--name", "ci")
    assert "\n" not in key
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "what is the balance"}
    ]

    openai.OpenAI(base_url=gateway_url, api_key=key, max_retries=0).chat.completions.create(
        model="fake-small", messages=messages
    )

    model = async_to_sync(catalog_model)("fake-small")
    assert model is not None
    cost = usage_cost_usd(
        price=model.price,
        input_tokens=count_prompt_tokens(messages),
        output_tokens=len(reply_for(messages, None).split()),
    )
    assert Decimal(ok("show_balance", slug)) == Decimal("20.00") - cost
    assert ok("show_balance", slug) == f"{Decimal('20.00') - cost:.10f}"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create_org", "", "--owner", "a@b.test"], "needs a name"),
        (["create_org", "X", "--owner", "not-an-email"], "not an e-mail address"),
        (["create_org", "X", "--owner", "a" * 250 + "@b.test"], "at most 254 characters"),
        (["grant_credits", "no-such-org", "5", "--reason", "x"], "no organisation"),
        (["grant_credits", "{slug}", "five", "--reason", "x"], "not a decimal"),
        (["grant_credits", "{slug}", "0.1234567890123", "--reason", "x"], "decimal places"),
        (["grant_credits", "{slug}", "-5", "--reason", "x"], "positive"),
        (["create_api_key", "no-such-org", "--name", "x"], "no organisation"),
        (["show_balance", "no-such-org"], "no organisation"),
        (["reconcile", "--held-longer-than", "-5"], "0 or more seconds"),
        (["reconcile", "--held-longer-than", str(10**20)], "at most"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(args, message):
    slug = ok("create_org", "Existing", "--owner", "o@e.test")
    result = manage(*[arg.format(slug=slug) for arg in args])

    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


@pytest.mark.django_db(transaction=True)
def test_create_org_run_again_answers_the_organisation_it_made():
    from portal.models import Organization

    first = ok("create_org", "Acme Research", "--owner", "ops@acme.test")
    again = manage("create_org", "Acme Research", "--owner", "OPS@acme.test")
    other_owner = ok("create_org", "Acme Research", "--owner", "someone@else.test")

    # A provisioning script that runs twice must not make a second organisation to top up.
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == first
    assert "already exists" in again.stderr
    assert other_owner != first
    assert Organization.objects.filter(name="Acme Research").count() == 2


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("number", [".nan", ".inf", "-.inf"])
def test_a_catalog_number_that_is_not_finite_is_named_with_its_line(tmp_path, number):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(f"providers: []\nmodels:\n  - name: m\n    price: {number}\n")

    result = manage("load_catalog", str(catalog))

    assert result.returncode != 0
    assert f"{number!r} is not a finite decimal number" in result.stderr
    assert "line 4" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.django_db(transaction=True)
def test_a_catalog_that_is_not_utf8_text_exits_non_zero_with_one_line(tmp_path):
    catalog = tmp_path / "catalog.yaml"
    catalog.write_bytes(b"\xff\xfeproviders: []\n")

    result = manage("load_catalog", str(catalog))

    assert result.returncode != 0
    assert "not UTF-8 text" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def transaction_named(stderr: str) -> str:
    found = re.search(r"transaction #\d+", stderr)
    assert found is not None, stderr
    return found.group()


@pytest.mark.django_db(transaction=True)
def test_grant_credits_run_again_with_its_reference_grants_nothing():
    slug = ok("create_org", "Acme Research", "--owner", "ops@acme.test")
    other = ok("create_org", "Other", "--owner", "ops@other.test")
    grant = ["5", "--reason", "welcome credit", "--reference", "welcome"]

    first = manage("grant_credits", slug, *grant)
    again = manage("grant_credits", slug, *grant)

    # A provisioning script that runs twice must not grant twice.
    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert "already granted" in again.stderr
    assert transaction_named(again.stderr) == transaction_named(first.stderr)
    assert len(again.stderr.strip().splitlines()) == 1
    assert again.stdout == ""
    assert ok("show_balance", slug) == "5.0000000000"
    # A reference is the organisation's own; a grant without one is made every time.
    ok("grant_credits", other, *grant)
    assert ok("show_balance", other) == "5.0000000000"
    ok("grant_credits", slug, "5", "--reason", "welcome credit")
    assert ok("show_balance", slug) == "10.0000000000"
    assert ok("reconcile") == "ledger clean"


@pytest.mark.django_db(transaction=True)
def test_grant_credits_refuses_a_reference_used_for_another_amount():
    slug = ok("create_org", "Acme Research", "--owner", "ops@acme.test")
    ok("grant_credits", slug, "5", "--reason", "welcome credit", "--reference", "welcome")

    result = manage(
        "grant_credits", slug, "50", "--reason", "welcome credit", "--reference", "welcome"
    )

    assert result.returncode != 0
    assert "already used for a grant of 5.0000000000 USD" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert ok("show_balance", slug) == "5.0000000000"


@pytest.mark.django_db(transaction=True)
def test_concurrent_grants_under_one_reference_grant_once():
    slug = ok("create_org", "Acme Research", "--owner", "ops@acme.test")
    grant = ["grant_credits", slug, "5", "--reason", "welcome credit", "--reference", "welcome"]

    results = [finished(process) for process in [manage_started(*grant) for _ in range(4)]]

    assert [result.returncode for result in results] == [0, 0, 0, 0], results
    assert sum("already granted" in result.stderr for result in results) == 3
    assert len({transaction_named(result.stderr) for result in results}) == 1
    assert ok("show_balance", slug) == "5.0000000000"
