"""The operator's admin finds a request by the id its client was given (x-request-id)."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.factories import make_key, make_org, make_usage


def _request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["usagerecord", "reservation"])
def test_a_pasted_request_id_is_looked_up_by_its_index(admin_client, path):
    key, _ = make_key(make_org())
    wanted, other = _request_id(), _request_id()
    make_usage(key, request_id=wanted)
    make_usage(key, request_id=other)

    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(f"/admin/billing/{path}/", {"q": f" {wanted} "})

    assert page.status_code == 200
    assert wanted in page.content.decode()
    assert other not in page.content.decode()
    searches = [q["sql"] for q in queries.captured_queries if wanted in q["sql"]]
    assert searches, "the search did not reach the database"
    assert all("UPPER(" not in sql and '"request_id" = ' in sql for sql in searches), searches


@pytest.mark.django_db
def test_other_terms_search_as_before(admin_client):
    acme, other = make_org(name="Acme Labs"), make_org(name="Zenith")
    wanted, unwanted = _request_id(), _request_id()
    make_usage(make_key(acme)[0], request_id=wanted)
    make_usage(make_key(other)[0], request_id=unwanted)

    page = admin_client.get("/admin/billing/usagerecord/", {"q": acme.slug[:4]})

    assert page.status_code == 200
    assert wanted in page.content.decode()
    assert unwanted not in page.content.decode()
