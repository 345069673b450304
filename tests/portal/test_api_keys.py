from __future__ import annotations

import ipaddress
import time
from datetime import timedelta
from decimal import Decimal

import openai
import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone
from openai.types.chat import ChatCompletion
from rest_framework.test import APIClient

from billing.models import SpendCap
from gateway.auth import Caller
from portal import api_keys
from portal.models import ApiKey, Membership
from portal.services import OrganizationError, api_key_create, api_key_revoke, api_key_rotate
from tests.factories import make_org


def test_a_generated_key_is_well_formed_and_distinct():
    keys = {api_keys.generate_key() for _ in range(200)}

    assert len(keys) == 200
    for key in keys:
        assert key.startswith("sb_")
        assert len(key) == api_keys.KEY_LENGTH
        assert api_keys.is_well_formed(key)


def test_every_single_character_change_breaks_the_checksum():
    key = api_keys.generate_key()
    for position in range(len(api_keys.KEY_PREFIX), len(key)):
        replacement = "0" if key[position] != "0" else "1"
        assert not api_keys.is_well_formed(key[:position] + replacement + key[position + 1 :])


@pytest.mark.django_db
def test_only_the_hash_and_a_display_prefix_are_stored():
    organization = make_org()

    api_key, secret = api_key_create(organization=organization, name="ci")

    stored = ApiKey.objects.get(pk=api_key.pk)
    assert stored.hashed_key == api_keys.hash_key(secret)
    assert secret.startswith(stored.prefix)
    assert len(stored.prefix) < len(secret) // 2
    assert secret not in str(ApiKey.objects.values().get(pk=api_key.pk))


@pytest.mark.django_db
def test_a_key_needs_a_name():
    with pytest.raises(OrganizationError):
        api_key_create(organization=make_org(), name="  ")


@pytest.mark.django_db
def test_a_name_longer_than_the_column_is_cut_to_it_as_a_rename_is():
    organization = make_org()
    client = Client()
    client.force_login(Membership.objects.get(organization=organization, role="owner").user)

    response = client.post("/dashboard/keys/create", {"org": organization.slug, "name": "n" * 150})

    assert response.status_code == 200
    assert ApiKey.objects.get(organization=organization).name == "n" * 100


@pytest.mark.django_db
def test_revoking_twice_keeps_the_first_revocation_time():
    api_key, _ = api_key_create(organization=make_org(), name="ci")
    api_key_revoke(api_key=api_key)
    first = api_key.revoked_at

    api_key_revoke(api_key=api_key)

    assert first is not None
    assert api_key.revoked_at == first


# --- The key page: limits, IP allowlist, rotation, spend (through the real gateway) ----------


def _chat(gateway_url: str, secret: str) -> ChatCompletion:
    return openai.OpenAI(
        base_url=gateway_url, api_key=secret, max_retries=0
    ).chat.completions.create(
        model="fake-small", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )


def _owner_client(organization) -> Client:
    client = Client()
    client.force_login(Membership.objects.get(organization=organization, role="owner").user)
    return client


LIMITS_FORM = {
    "spend_cap_usd": "",
    "spend_cap_window": "month",
    "requests_per_minute": "",
    "tokens_per_minute": "",
    "max_concurrent_requests": "",
    "allowed_models": "",
    "ip_allowlist": "",
    "expires_at": "",
}


def test_a_key_used_from_an_allowed_address_works_and_its_spend_shows(
    gateway_url, catalog, fake_provider
):
    organization = make_org()
    key, secret = api_key_create(organization=organization, name="office")
    client = _owner_client(organization)

    saved = client.post(
        f"/dashboard/keys/{key.pk}/",
        {**LIMITS_FORM, "org": organization.slug, "ip_allowlist": "10.0.0.0/8\n127.0.0.1"},
    )
    completion = _chat(gateway_url, secret)

    assert saved.status_code == 302
    key.refresh_from_db()
    assert key.ip_allowlist == ["10.0.0.0/8", "127.0.0.1/32"]
    assert completion.choices[0].message.content
    page = client.get(f"/dashboard/keys/{key.pk}/", {"org": organization.slug})
    assert page.context["spend_total_usd"] != "0.0000000000"
    assert page.context["spend_total_usd"] in page.content.decode()


def test_a_key_used_from_outside_its_allowlist_gets_403_in_openais_shape(
    gateway_url, catalog, fake_provider
):
    organization = make_org()
    key, secret = api_key_create(organization=organization, name="office")
    _owner_client(organization).post(
        f"/dashboard/keys/{key.pk}/",
        {**LIMITS_FORM, "org": organization.slug, "ip_allowlist": "203.0.113.0/24"},
    )

    with pytest.raises(openai.PermissionDeniedError) as caught:
        _chat(gateway_url, secret)

    assert caught.value.status_code == 403
    assert caught.value.code == "ip_not_allowed"
    assert caught.value.type == "permission_error"
    assert fake_provider.calls == []


@pytest.mark.django_db
def test_a_bad_network_in_the_allowlist_is_refused_and_nothing_is_saved():
    organization = make_org()
    key, _ = api_key_create(organization=organization, name="office")

    response = _owner_client(organization).post(
        f"/dashboard/keys/{key.pk}/",
        {**LIMITS_FORM, "org": organization.slug, "ip_allowlist": "10.0.0.0/8\nnot-an-ip"},
    )

    assert response.status_code == 400
    assert "not an IP address or CIDR network" in response.content.decode()
    key.refresh_from_db()
    assert key.ip_allowlist == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    "field", ["requests_per_minute", "tokens_per_minute", "max_concurrent_requests"]
)
@pytest.mark.parametrize("value", ["2147483648", str(10**20)])
def test_a_limit_too_large_for_its_column_is_refused_with_a_message(field, value):
    organization = make_org()
    key, _ = api_key_create(organization=organization, name="ci")

    response = _owner_client(organization).post(
        f"/dashboard/keys/{key.pk}/", {**LIMITS_FORM, "org": organization.slug, field: value}
    )

    assert response.status_code == 400
    assert "at most 2147483647" in response.content.decode()
    key.refresh_from_db()
    assert getattr(key, field) is None


@pytest.mark.django_db
def test_the_largest_limit_a_column_holds_is_saved():
    organization = make_org()
    key, _ = api_key_create(organization=organization, name="ci")

    _owner_client(organization).post(
        f"/dashboard/keys/{key.pk}/",
        {**LIMITS_FORM, "org": organization.slug, "tokens_per_minute": "2147483647"},
    )

    key.refresh_from_db()
    assert key.tokens_per_minute == 2147483647


@pytest.mark.django_db
@pytest.mark.parametrize("hours", ["721", str(10**13)])
def test_rotating_with_an_overlap_beyond_the_maximum_is_refused_with_a_message(hours):
    organization = make_org()
    old, _ = api_key_create(organization=organization, name="prod")

    response = _owner_client(organization).post(
        f"/dashboard/keys/{old.pk}/rotate",
        {"org": organization.slug, "overlap_hours": hours},
        follow=True,
    )

    assert "from 0 to 720" in response.content.decode()
    assert not ApiKey.objects.filter(rotated_from=old).exists()


@pytest.mark.django_db
def test_the_key_page_sets_and_removes_the_spend_cap_with_the_other_limits():
    organization = make_org()
    key, _ = api_key_create(organization=organization, name="ci")
    client = _owner_client(organization)
    form = {
        **LIMITS_FORM,
        "org": organization.slug,
        "spend_cap_usd": "2.50",
        "spend_cap_window": "day",
        "requests_per_minute": "60",
        "allowed_models": "fake-small, other",
    }

    client.post(f"/dashboard/keys/{key.pk}/", form)
    key.refresh_from_db()
    cap = SpendCap.objects.get(api_key=key)
    client.post(f"/dashboard/keys/{key.pk}/", {**form, "spend_cap_usd": ""})

    assert (cap.amount_usd, cap.window) == (Decimal("2.50"), "day")
    assert key.requests_per_minute == 60
    assert key.allowed_models == ["fake-small", "other"]
    assert not SpendCap.objects.filter(api_key=key).exists()


def test_after_rotation_the_old_key_works_until_the_overlap_ends_then_gets_401(
    gateway_url, catalog, fake_provider
):
    organization = make_org()
    old, old_secret = api_key_create(organization=organization, name="prod")
    ApiKey.objects.filter(pk=old.pk).update(requests_per_minute=100)
    SpendCap.objects.create(api_key=old, amount_usd=Decimal("5"), window="week")
    old.refresh_from_db()

    new, new_secret = api_key_rotate(api_key=old, overlap=timedelta(seconds=3))

    assert _chat(gateway_url, old_secret).choices  # still inside the overlap
    assert _chat(gateway_url, new_secret).choices
    deadline = time.monotonic() + 20
    while True:
        try:
            _chat(gateway_url, old_secret)
        except openai.AuthenticationError as exc:
            assert "expired" in exc.message
            break
        assert time.monotonic() < deadline, "the old key still works after its overlap"
    assert _chat(gateway_url, new_secret).choices
    # The replacement keeps the name, the limits (portal's) and the spend cap (billing's).
    assert (new.name, new.requests_per_minute, new.rotated_from_id) == ("prod", 100, old.pk)
    assert SpendCap.objects.get(api_key=new).amount_usd == Decimal("5")


def test_a_key_revoked_through_the_management_api_stops_at_the_gateway_within_its_cache_time(
    gateway_url, catalog, fake_provider, settings
):
    settings.GATEWAY_KEY_CACHE_SECONDS = 1  # the gateway caches each key this long
    organization = make_org()
    other = make_org()
    key, secret = api_key_create(organization=organization, name="prod")
    _, others_secret = api_key_create(organization=other, name="theirs")
    assert _chat(gateway_url, secret).choices  # authenticated, and now cached
    owner = Membership.objects.get(organization=organization, role="owner").user
    api = APIClient()
    api.force_login(owner)

    revoked = api.post(f"/api/v1/organizations/{organization.slug}/keys/{key.pk}/revoke/")

    assert revoked.status_code == 200
    deadline = time.monotonic() + 1 + 20  # the cache time, and room for a slow machine
    while True:
        try:
            _chat(gateway_url, secret)
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline, "the revoked key still works after the cache time"
    assert _chat(gateway_url, others_secret).choices  # another organisation's key is untouched


@pytest.mark.django_db
def test_rotating_through_the_page_shows_the_new_secret_once():
    organization = make_org()
    old, _ = api_key_create(organization=organization, name="prod")

    response = _owner_client(organization).post(
        f"/dashboard/keys/{old.pk}/rotate", {"org": organization.slug, "overlap_hours": "2"}
    )

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    new = ApiKey.objects.get(rotated_from=old)
    assert new.hashed_key == api_keys.hash_key(response.context["secret"])
    old.refresh_from_db()
    assert old.expires_at is not None
    assert timedelta(hours=1, minutes=59) < old.expires_at - timezone.now() <= timedelta(hours=2)


@pytest.mark.django_db
def test_a_revoked_key_cannot_be_rotated():
    organization = make_org()
    old, _ = api_key_create(organization=organization, name="prod")
    api_key_revoke(api_key=old)

    with pytest.raises(OrganizationError):
        api_key_rotate(api_key=old, overlap=timedelta(hours=1))
    assert not ApiKey.objects.filter(rotated_from=old).exists()


@pytest.mark.parametrize(
    ("allowlist", "host", "allowed"),
    [
        ([], None, True),  # no allowlist: any client
        (["203.0.113.0/24"], "203.0.113.9", True),
        (["203.0.113.0/24"], "203.0.114.1", False),
        (["203.0.113.7/32"], "::ffff:203.0.113.7", True),  # IPv4 seen through an IPv6 socket
        (["2001:db8::/32"], "2001:db8:1::5", True),
        (["2001:db8::/32"], "2001:db9::1", False),
        (["203.0.113.0/24"], None, False),  # no address in the scope: refused, not guessed
        (["203.0.113.0/24"], "not-an-address", False),
    ],
)
def test_the_gateway_matches_the_client_address_against_the_allowlist(allowlist, host, allowed):
    networks = tuple(ipaddress.ip_network(n) for n in allowlist)

    assert Caller(api_key_id=1, organization_id=1, ip_networks=networks).may_connect_from(host) is (
        allowed
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "field", ["requests_per_minute", "tokens_per_minute", "max_concurrent_requests"]
)
def test_a_key_limit_of_zero_is_refused_by_the_model_the_admin_saves_through(field):
    # The dashboard and the API refuse 0 (portal.services); the admin's form validates the
    # model's fields, and a limit of 0 there refused every request with a Retry-After that
    # never came true.
    key, _ = api_key_create(organization=make_org(), name="ci")
    setattr(key, field, 0)

    with pytest.raises(ValidationError) as caught:
        key.full_clean()

    assert field in caught.value.message_dict
    setattr(key, field, 1)
    key.full_clean()
