"""The management API's billing endpoints (balance, usage, request log) and GET /api/v1/key.

Alice owns Acme, Bob is a plain member of it; Charlie owns Rival.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from rest_framework.test import APIClient

from billing.models import SpendCap
from billing.services import CapTerms, credit_reserve, reservation_void
from portal.services import api_key_create, api_key_revoke, api_key_update
from tests.factories import make_usage
from tests.portal.api_helpers import Team, as_token, as_user, token_for


def org_url(team: Team, tail: str) -> str:
    return f"/api/v1/organizations/{team.acme.slug}/{tail}"


@pytest.fixture
def usage(team):
    """Two keys of Acme (Alice's, Bob's) and one of Rival, each with charged requests."""
    alices, _ = api_key_create(organization=team.acme, name="alice-key", created_by=team.alice)
    bobs, _ = api_key_create(organization=team.acme, name="bob-key", created_by=team.bob)
    rivals, _ = api_key_create(organization=team.rival, name="rival", created_by=team.charlie)
    day1 = datetime(2026, 3, 2, 10, tzinfo=UTC)  # a Monday
    day2 = datetime(2026, 3, 3, 11, tzinfo=UTC)
    records = {
        "a1": make_usage(alices, model="fake-small", at=day1),  # 0.00125 USD
        "a2": make_usage(alices, model="fake-large", at=day2, input_tokens=2000, output_tokens=0),
        "b1": make_usage(bobs, model="fake-small", at=day2, status="interrupted"),
        "r1": make_usage(rivals, model="fake-small", at=day1),
    }
    return alices, bobs, rivals, records


def test_the_balance_is_exact_and_the_organisations_own(team):
    key, _ = api_key_create(organization=team.acme, name="k")
    credit_reserve(
        request_id="r-held",
        organization_id=team.acme.pk,
        api_key_id=key.pk,
        amount_usd=Decimal("0.5"),
    )

    response = as_user(team.bob).get(org_url(team, "balance/"))

    assert response.status_code == 200
    assert response.json() == {
        "balance_usd": "12.5000000000",
        "reserved_usd": "0.5000000000",
        "available_usd": "12.0000000000",
    }
    assert as_user(team.charlie).get(org_url(team, "balance/")).status_code == 404
    reservation_void(request_id="r-held")


def test_usage_by_model_per_day(team, usage):
    response = as_user(team.alice).get(
        org_url(team, "usage/"), {"since": "2026-03-01", "until": "2026-03-31"}
    )

    assert response.status_code == 200
    body = response.json()
    assert (body["period"], body["group_by"]) == ("day", "model")
    assert [
        (b["period_start"], b["group"], b["requests"], b["input_tokens"], b["cost_usd"])
        for b in body["buckets"]
    ] == [
        ("2026-03-02", "fake-small", 1, 1000, "0.0012500000"),
        ("2026-03-03", "fake-large", 1, 2000, "0.0010000000"),
        ("2026-03-03", "fake-small", 1, 1000, "0.0012500000"),
    ]


def test_usage_by_key_per_week_and_month(team, usage):
    alices, bobs, _, _ = usage
    client = as_user(team.alice)
    dates = {"since": "2026-03-01", "until": "2026-03-31"}

    weekly = client.get(org_url(team, "usage/"), {**dates, "period": "week", "group_by": "key"})
    monthly = client.get(org_url(team, "usage/"), {**dates, "period": "month"})

    assert [
        (b["period_start"], b["api_key_id"], b["requests"], b["cost_usd"])
        for b in weekly.json()["buckets"]
    ] == [
        ("2026-03-02", alices.pk, 2, "0.0022500000"),
        ("2026-03-02", bobs.pk, 1, "0.0012500000"),
    ]
    assert [(b["period_start"], b["group"], b["requests"]) for b in monthly.json()["buckets"]] == [
        ("2026-03-01", "fake-large", 1),
        ("2026-03-01", "fake-small", 2),
    ]


def test_a_member_sees_only_their_own_keys_usage(team, usage):
    _, bobs, _, records = usage

    buckets = (
        as_user(team.bob)
        .get(org_url(team, "usage/"), {"since": "2026-03-01", "group_by": "key"})
        .json()["buckets"]
    )
    log = as_user(team.bob).get(org_url(team, "requests/")).json()["results"]

    assert {b["api_key_id"] for b in buckets} == {bobs.pk}
    assert [r["request_id"] for r in log] == [records["b1"].request_id]


def test_the_request_log_is_newest_first_and_filters(team, usage):
    alices, _, _, records = usage
    client = as_user(team.alice)

    def ids(**params):
        response = client.get(org_url(team, "requests/"), params)
        assert response.status_code == 200, response.json()
        return [r["request_id"] for r in response.json()["results"]]

    assert ids() == [records[n].request_id for n in ("b1", "a2", "a1")]
    assert ids(key=alices.pk) == [records["a2"].request_id, records["a1"].request_id]
    assert ids(model="fake-large") == [records["a2"].request_id]
    assert ids(status="interrupted") == [records["b1"].request_id]
    assert ids(since="2026-03-03") == [records["b1"].request_id, records["a2"].request_id]
    assert ids(until="2026-03-02") == [records["a1"].request_id]
    assert ids(model="fake-large", status="interrupted") == []


def test_the_request_log_pages_with_a_cursor(team, usage):
    _, _, _, records = usage
    client = as_user(team.alice)

    first = client.get(org_url(team, "requests/"), {"page_size": 2}).json()
    second = client.get(first["next"]).json()

    assert [r["request_id"] for r in first["results"]] == [
        records["b1"].request_id,
        records["a2"].request_id,
    ]
    assert [r["request_id"] for r in second["results"]] == [records["a1"].request_id]
    assert second["next"] is None
    assert first["results"][0]["cost_usd"] == "0.0012500000"


def test_a_bad_filter_is_a_400_naming_the_field_in_drfs_error_shape(team, usage):
    client = as_user(team.alice)

    for params, field in (
        ({"since": "yesterday"}, "since"),
        ({"status": "fine"}, "status"),
        ({"key": "abc"}, "key"),
        ({"since": "2026-03-05", "until": "2026-03-01"}, "non_field_errors"),
        ({"until": "9999-12-31"}, "non_field_errors"),
        ({"since": "1900-01-01", "until": "2026-01-01"}, "non_field_errors"),
        ({"key": str(2**70)}, "key"),
    ):
        for endpoint in ("requests/", "usage/"):
            response = client.get(org_url(team, endpoint), params)
            assert response.status_code == 400
            # As every other 400 of the API: each field names a list of messages (strings).
            assert list(response.json()) == [field]
            messages = response.json()[field]
            assert messages and all(isinstance(message, str) for message in messages)


def test_another_organisations_key_filter_finds_nothing(team, usage):
    _, _, rivals, _ = usage

    response = as_user(team.alice).get(org_url(team, "requests/"), {"key": rivals.pk})

    assert response.json()["results"] == []


def test_a_management_token_reads_usage(team, usage):
    secret = token_for(team.alice, team.acme, "admin")

    response = as_token(secret).get(org_url(team, "requests/"))

    assert response.status_code == 200
    assert len(response.json()["results"]) == 3


# GET /api/v1/key


def key_client(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def test_the_calling_key_sees_its_limits_usage_and_what_remains(team):
    key, secret = api_key_create(organization=team.acme, name="capped", created_by=team.bob)
    api_key_update(
        api_key=key,
        name="capped",
        expires_at=None,
        allowed_models=["fake-small"],
        requests_per_minute=60,
        tokens_per_minute=None,
        max_concurrent_requests=3,
        ip_allowlist=[],
    )
    SpendCap.objects.create(api_key=key, amount_usd=Decimal("0.01"), window="day")
    cap = CapTerms(amount_usd=Decimal("0.01"), window=SpendCap.Window.DAY)
    credit_reserve(
        request_id="r-capped",
        organization_id=team.acme.pk,
        api_key_id=key.pk,
        amount_usd=Decimal("0.003"),
        spend_cap=cap,
    )
    make_usage(key, request_id="r-capped")  # 0.00125 USD now, in the cap's window
    make_usage(key, at=datetime.now(UTC) - timedelta(days=3))  # earlier: total only
    credit_reserve(
        request_id="r-in-flight",
        organization_id=team.acme.pk,
        api_key_id=key.pk,
        amount_usd=Decimal("0.002"),
        spend_cap=cap,
    )
    other, _ = api_key_create(organization=team.acme, name="other")
    make_usage(other)

    response = key_client(secret).get("/api/v1/key")

    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "capped" and body["organization"] == team.acme.slug
    assert body["limits"] == {
        "requests_per_minute": 60,
        "tokens_per_minute": None,
        "max_concurrent_requests": 3,
        "allowed_models": ["fake-small"],
        "expires_at": None,
        "spend_cap": {"amount_usd": "0.0100000000", "window": "day"},
    }
    assert body["usage"]["total_spent_usd"] == "0.0025000000"
    assert body["usage"]["total_requests"] == 2
    assert body["usage"]["window"]["spent_usd"] == "0.0012500000"
    assert body["usage"]["window"]["reserved_usd"] == "0.0020000000"
    # The cap leaves 0.01 - 0.00125 spent - 0.002 held; the wallet 12.5 - 3 x 0.00125 - 0.002.
    assert body["remaining"] == {
        "spend_cap_usd": "0.0067500000",
        "wallet_available_usd": "12.4942500000",
        "spend_usd": "0.0067500000",
    }
    reservation_void(request_id="r-in-flight")


def test_a_key_without_a_cap_may_spend_the_wallet(team):
    _, secret = api_key_create(organization=team.acme, name="k")

    body = key_client(secret).get("/api/v1/key").json()

    assert body["limits"]["spend_cap"] is None and body["usage"]["window"] is None
    assert body["remaining"] == {
        "spend_cap_usd": None,
        "wallet_available_usd": "12.5000000000",
        "spend_usd": "12.5000000000",
    }


def test_the_key_endpoint_refuses_anything_but_a_live_api_key(team):
    key, secret = api_key_create(organization=team.acme, name="k")
    token = token_for(team.alice, team.acme, "owner")
    expired, expired_secret = api_key_create(organization=team.acme, name="old")
    api_key_update(
        api_key=expired,
        name="old",
        expires_at=datetime.now(UTC) - timedelta(seconds=1),
        allowed_models=[],
        requests_per_minute=None,
        tokens_per_minute=None,
        max_concurrent_requests=None,
        ip_allowlist=[],
    )

    assert APIClient().get("/api/v1/key").status_code == 401
    assert key_client(token).get("/api/v1/key").status_code == 401
    assert key_client("sb_garbage").get("/api/v1/key").status_code == 401
    assert key_client(expired_secret).get("/api/v1/key").status_code == 401
    assert as_user(team.alice).get("/api/v1/key").status_code == 401
    api_key_revoke(api_key=key)
    assert key_client(secret).get("/api/v1/key").status_code == 401


def test_the_key_endpoint_holds_the_keys_ip_allowlist_as_the_gateway_does(team):
    key, secret = api_key_create(organization=team.acme, name="office only")

    def allow(networks: list[str]) -> None:
        api_key_update(
            api_key=key,
            name="office only",
            expires_at=None,
            allowed_models=[],
            requests_per_minute=None,
            tokens_per_minute=None,
            max_concurrent_requests=None,
            ip_allowlist=networks,
        )

    allow(["10.0.0.0/8"])  # the test client calls from 127.0.0.1
    refused = key_client(secret).get("/api/v1/key")
    allow(["10.0.0.0/8", "127.0.0.1"])
    admitted = key_client(secret).get("/api/v1/key")

    assert refused.status_code == 403
    assert "IP address" in refused.json()["detail"]
    assert "limits" not in refused.json()
    assert admitted.status_code == 200
