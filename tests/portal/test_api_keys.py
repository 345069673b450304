from __future__ import annotations

import pytest

from portal import api_keys
from portal.models import ApiKey
from portal.services import OrganizationError, api_key_create, api_key_revoke
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
def test_revoking_twice_keeps_the_first_revocation_time():
    api_key, _ = api_key_create(organization=make_org(), name="ci")
    api_key_revoke(api_key=api_key)
    first = api_key.revoked_at

    api_key_revoke(api_key=api_key)

    assert first is not None
    assert api_key.revoked_at == first
