"""The usage pages: charts data, the request log with filters and pages, the CSV export, and
the catalog page. Alice owns Acme, Bob is a plain member; Charlie owns Rival."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from billing import usage_views
from gateway.services import catalog_load
from portal.services import api_key_create
from tests.factories import make_usage
from tests.portal.api_helpers import Team, make_team


def browser(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def csv_rows(response) -> list[dict[str, str]]:
    async def read() -> bytes:  # the export streams as an ASGI server serves it: async
        return b"".join([chunk async for chunk in response.streaming_content])

    body = async_to_sync(read)().decode()
    return list(csv.DictReader(io.StringIO(body)))


@pytest.fixture
def team(db) -> Team:
    return make_team()


@pytest.fixture
def usage(team: Team):
    alices, _ = api_key_create(organization=team.acme, name="alice-key", created_by=team.alice)
    bobs, _ = api_key_create(organization=team.acme, name="bob-key", created_by=team.bob)
    rivals, _ = api_key_create(organization=team.rival, name="rival-key", created_by=team.charlie)
    day1 = datetime(2026, 3, 2, 10, tzinfo=UTC)
    day2 = datetime(2026, 3, 3, 11, tzinfo=UTC)
    return {
        "a1": make_usage(alices, model="fake-small", at=day1),
        "a2": make_usage(alices, model="fake-large", at=day2),
        "b1": make_usage(bobs, model="fake-small", at=day2, status="interrupted"),
        "r1": make_usage(rivals, model="rival-model", at=day1),
    }


def test_pages_need_a_login(client, team):
    for url in ("/dashboard/usage/", "/dashboard/usage/log", "/dashboard/usage/log.csv"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_the_chart_has_one_series_per_model_over_every_day(team, usage):
    response = browser(team.alice).get(
        "/dashboard/usage/", {"since": "2026-03-01", "until": "2026-03-04"}
    )

    assert response.status_code == 200
    chart = response.context["chart"]
    assert len(chart["x"]) == 4  # 1st to 4th of March, empty days included
    assert chart["x"][0] == int(datetime(2026, 3, 1, tzinfo=UTC).timestamp())
    by_label = {s["label"]: s for s in chart["series"]}
    assert set(by_label) == {"fake-small", "fake-large"}
    assert by_label["fake-small"]["cost_usd"] == ["0", "0.0012500000", "0.0012500000", "0"]
    assert by_label["fake-large"]["tokens"] == [0, 0, 1500, 0]
    page = response.content.decode()
    assert "uPlot.iife.min.js" in page and "usage-chart-data" in page
    assert "rival-model" not in page


def test_the_chart_by_key_for_a_member_shows_only_their_key(team, usage):
    response = browser(team.bob).get(
        "/dashboard/usage/", {"since": "2026-03-01", "until": "2026-03-04", "group_by": "key"}
    )

    labels = [s["label"] for s in response.context["chart"]["series"]]
    assert len(labels) == 1 and labels[0].startswith("bob-key (")


def test_the_log_filters_and_shows_only_the_organisations_requests(team, usage):
    client = browser(team.alice)

    everything = client.get("/dashboard/usage/log")
    interrupted = client.get("/dashboard/usage/log", {"status": "interrupted"})

    assert [r.request_id for r, _ in everything.context["rows"]] == [
        usage["b1"].request_id,
        usage["a2"].request_id,
        usage["a1"].request_id,
    ]
    assert usage["r1"].request_id not in everything.content.decode()
    assert [r.request_id for r, _ in interrupted.context["rows"]] == [usage["b1"].request_id]


def test_the_log_pages(team, usage, monkeypatch):
    monkeypatch.setattr(usage_views, "LOG_PAGE_SIZE", 2)
    client = browser(team.alice)

    first = client.get("/dashboard/usage/log", {"model": "fake-small", "page": "1"})
    everything = client.get("/dashboard/usage/log", {"page": "2"})

    assert len(first.context["rows"]) == 2 and not first.context["page"].has_next()
    assert [r.request_id for r, _ in everything.context["rows"]] == [usage["a1"].request_id]
    assert "page=1" in everything.content.decode()  # the link back, filters kept


def test_a_bad_filter_shows_a_message_not_an_error(team, usage):
    response = browser(team.alice).get("/dashboard/usage/log", {"since": "not a date"})

    assert response.status_code == 200
    assert response.context["rows"] == []
    assert "since" in response.content.decode()


def test_the_csv_export_streams_every_matching_request(team, usage, monkeypatch):
    monkeypatch.setattr(usage_views, "LOG_PAGE_SIZE", 1)  # the export is not paged

    response = browser(team.alice).get("/dashboard/usage/log.csv", {"model": "fake-small"})

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "text/csv"
    assert "attachment" in response["Content-Disposition"]
    rows = csv_rows(response)
    assert [r["request_id"] for r in rows] == [usage["b1"].request_id, usage["a1"].request_id]
    assert rows[0]["cost_usd"] == "0.0012500000"
    assert rows[0]["status"] == "interrupted"
    assert rows[0]["api_key"].startswith("bob-key (")


@pytest.mark.parametrize("name", ['=HYPERLINK("http://x.test")', "+1+1", "-2+3", "@SUM(A1)"])
def test_a_key_name_a_spreadsheet_would_run_as_a_formula_is_exported_as_text(team, name):
    # Any member names their keys; an owner opens the export in a spreadsheet.
    key, _ = api_key_create(organization=team.acme, name=name, created_by=team.bob)
    make_usage(key, model="fake-small")

    rows = csv_rows(browser(team.alice).get("/dashboard/usage/log.csv"))

    assert rows[0]["api_key"] == f"'{name} ({key.prefix})"


def test_the_csv_export_leaves_in_chunks_not_read_whole(team, usage, monkeypatch):
    monkeypatch.setattr(usage_views, "CSV_ROWS_PER_CHUNK", 1)
    response: Any = browser(team.alice).get("/dashboard/usage/log.csv")

    async def chunks() -> list[bytes]:
        return [chunk async for chunk in response.streaming_content]

    # an ASGI server reads an async iterator as it goes; a sync one it would buffer whole
    assert response.is_async
    received = async_to_sync(chunks)()
    rows = list(csv.DictReader(io.StringIO(b"".join(received).decode())))
    assert len(rows) >= 2
    assert len(received) == 1 + len(rows)  # the header, then one chunk a row


def test_a_members_csv_holds_only_their_keys(team, usage):
    response = browser(team.bob).get("/dashboard/usage/log.csv")

    rows = csv_rows(response)
    assert [r["request_id"] for r in rows] == [usage["b1"].request_id]


def test_a_bad_csv_filter_is_a_400_with_a_message(team, usage):
    response = browser(team.alice).get("/dashboard/usage/log.csv", {"until": "soon"})

    assert response.status_code == 400
    assert "until" in response.content.decode()


def test_another_organisations_slug_is_a_404(team, usage):
    client = browser(team.charlie)
    for url in ("/dashboard/usage/", "/dashboard/usage/log", "/dashboard/usage/log.csv"):
        assert client.get(url, {"org": team.acme.slug}).status_code == 404


def test_the_catalog_lists_models_with_prices_and_context(db, client):
    catalog_load(
        data={
            "providers": [{"name": "p", "kind": "demo"}],
            "models": [
                {
                    "name": "m-one",
                    "routes": [{"provider": "p", "upstream_model": "x"}],
                    "price": {"input": "0.50", "output": "10", "cached_input": "0.125"},
                    "context_length": 128000,
                }
            ],
        }
    )

    response = client.get("/catalog/")

    assert response.status_code == 200
    assert response.context["models"] == [
        {
            "name": "m-one",
            "input": "0.5",
            "output": "10",
            "cached_input": "0.125",
            "cache_write": "0.5",
            "context_length": 128000,
            "max_output_tokens": 4096,
        }
    ]
    assert "128000" in response.content.decode()
