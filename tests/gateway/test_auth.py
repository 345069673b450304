"""Key authentication: malformed keys cost no query; known keys are cached briefly."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync

from gateway.auth import authenticate, bearer_token
from gateway.errors import InvalidApiKey
from portal import api_keys
from portal.services import api_key_revoke
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db


def _well_formed_unknown_key() -> str:
    return api_keys.generate_key()


@pytest.mark.parametrize(
    "raw_key",
    ["", "sk-proj-abc", "sb_short", "sb_" + "A" * 38, "sb_" + "é" * 38],
)
def test_it_rejects_a_malformed_key_without_a_query(django_assert_num_queries, raw_key):
    with django_assert_num_queries(0), pytest.raises(InvalidApiKey):
        async_to_sync(authenticate)(raw_key)


def test_it_rejects_a_key_whose_checksum_is_off_by_one_character(django_assert_num_queries):
    key = api_keys.generate_key()
    tampered = key[:10] + ("a" if key[10] != "a" else "b") + key[11:]

    with django_assert_num_queries(0), pytest.raises(InvalidApiKey):
        async_to_sync(authenticate)(tampered)


def test_a_well_formed_unknown_key_costs_one_query_then_none(django_assert_num_queries):
    # The positive control for the tests above: this path's queries are counted.
    key = _well_formed_unknown_key()
    with django_assert_num_queries(1), pytest.raises(InvalidApiKey):
        async_to_sync(authenticate)(key)
    with django_assert_num_queries(0), pytest.raises(InvalidApiKey):
        async_to_sync(authenticate)(key)


def test_it_finds_the_keys_organisation_and_caches_it(django_assert_num_queries):
    org = make_org()
    make_org()  # another organisation's key must never be confused with this one
    api_key, secret = make_key(org)

    with django_assert_num_queries(1):
        caller = async_to_sync(authenticate)(secret)
    with django_assert_num_queries(0):
        assert async_to_sync(authenticate)(secret) == caller
    assert (caller.api_key_id, caller.organization_id) == (api_key.pk, org.pk)


def test_a_revoked_key_is_refused_once_the_cache_expires(settings):
    settings.GATEWAY_KEY_CACHE_SECONDS = 0
    api_key, secret = make_key(make_org())
    async_to_sync(authenticate)(secret)

    api_key_revoke(api_key=api_key)

    with pytest.raises(InvalidApiKey):
        async_to_sync(authenticate)(secret)


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", ""), ("", ""), ("Bearer", "")],
)
def test_bearer_token_reads_only_the_bearer_scheme(header, token):
    assert bearer_token(header) == token
