"""The cross-tenant matrix, generated from the URL configuration.

Every route (page or API) that takes a parameter is called by Charlie, who owns Rival, with the
parameters of objects that belong to Acme: each method answers 404 (or 403, or 405 for a method
the route lacks, but never only 405) and nothing in the database changes. Where the route also
names an organisation, it is tried with Charlie's own organisation and Acme's object ids too.

A new route with a parameter fails `test_every_route_with_a_parameter_is_in_the_matrix` until it
is added to OBJECTS (how to make the parameters of an Acme object) or, for routes that hold no
organisation's data, to EXEMPT with the reason. Every dashboard page without a path parameter
takes its organisation from `?org=`: each is called with Acme's slug and must answer 404 (or
405), unless QUERY_EXEMPT says why not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from billing.models import (
    Account,
    CardPayment,
    LedgerTransaction,
    SpendCap,
    Statement,
    UsageRecord,
)
from billing.services import spend_cap_set
from billing.statements import statement_issue
from portal.management_tokens import management_token_create
from portal.models import ApiKey, Invitation, ManagementToken, Membership, Organization, User
from portal.services import api_key_create, invitation_create
from tests.factories import make_org, make_usage


@dataclass
class World:
    acme: Organization
    rival: Organization
    key: ApiKey  # Acme's
    token: ManagementToken  # Acme's
    charlie_token: str  # a management token of Rival (Charlie is its owner)
    bob: Membership  # a plain member of Acme
    invitation: Invitation  # Acme's, pending
    statement: Statement  # Acme's
    payment: CardPayment  # Acme's


# Route name -> the URL parameters of an object of Acme's.
OBJECTS: dict[str, Callable[[World], dict[str, Any]]] = {
    # pages
    "api_key_revoke": lambda w: {"api_key_id": w.key.pk},
    "api_key": lambda w: {"api_key_id": w.key.pk},
    "api_key_rename": lambda w: {"api_key_id": w.key.pk},
    "api_key_rotate": lambda w: {"api_key_id": w.key.pk},
    "invitation_revoke": lambda w: {"invitation_id": w.invitation.pk},
    "member_role": lambda w: {"member_id": w.bob.pk},
    "member_remove": lambda w: {"member_id": w.bob.pk},
    "ownership_transfer": lambda w: {"member_id": w.bob.pk},
    "statement_detail": lambda w: {"statement_id": w.statement.pk},
    "statement_csv": lambda w: {"statement_id": w.statement.pk},
    "statement_pdf": lambda w: {"statement_id": w.statement.pk},
    "add_credit_status": lambda w: {"payment_intent_id": w.payment.stripe_payment_intent_id},
    "management_token_revoke": lambda w: {"token_id": w.token.pk},
    # management API
    "api_v1_organization": lambda w: {"organization": w.acme.slug},
    "api_v1_members": lambda w: {"organization": w.acme.slug},
    "api_v1_keys": lambda w: {"organization": w.acme.slug},
    "api_v1_key": lambda w: {"organization": w.acme.slug, "key_id": w.key.pk},
    "api_v1_key_revoke": lambda w: {"organization": w.acme.slug, "key_id": w.key.pk},
    "api_v1_tokens": lambda w: {"organization": w.acme.slug},
    "api_v1_token_revoke": lambda w: {"organization": w.acme.slug, "token_id": w.token.pk},
    "api_v1_balance": lambda w: {"organization": w.acme.slug},
    "api_v1_usage": lambda w: {"organization": w.acme.slug},
    "api_v1_requests": lambda w: {"organization": w.acme.slug},
    "api_v1_member": lambda w: {"organization": w.acme.slug, "member_id": w.bob.pk},
    "api_v1_ownership_transfer": lambda w: {"organization": w.acme.slug, "member_id": w.bob.pk},
    "api_v1_invitations": lambda w: {"organization": w.acme.slug},
    "api_v1_invitation_revoke": lambda w: {
        "organization": w.acme.slug,
        "invitation_id": w.invitation.pk,
    },
    "api_v1_key_rotate": lambda w: {"organization": w.acme.slug, "key_id": w.key.pk},
    "api_v1_key_spend_cap": lambda w: {"organization": w.acme.slug, "key_id": w.key.pk},
    "api_v1_statements": lambda w: {"organization": w.acme.slug},
    "api_v1_statement": lambda w: {"organization": w.acme.slug, "statement_id": w.statement.pk},
    "api_v1_statement_csv": lambda w: {
        "organization": w.acme.slug,
        "statement_id": w.statement.pk,
    },
    "api_v1_statement_pdf": lambda w: {
        "organization": w.acme.slug,
        "statement_id": w.statement.pk,
    },
}

# Route prefixes whose parameters are not an organisation's objects, and why.
EXEMPT = {
    "admin/": "the operators' admin: staff only, every organisation by design",
    "accounts/": "allauth's account pages: keyed by one-time secrets sent to the user",
    "v1/": "the gateway: served by gateway/asgi.py, authenticated by an API key, whose "
    "only parameters are model names from the shared catalog",
    "static/": "static files",
    "invitations/": "an invitation's answer page: keyed by the one-time secret e-mailed to the "
    "invitee, and only the invited e-mail address may answer",
}

# Dashboard pages without a path parameter name their organisation in the query string
# (`?org=<slug>`) or the form; these do not, and why.
QUERY_EXEMPT = {
    "organizations": "lists the caller's own organisations and creates new ones; names none",
}

METHODS = ("get", "post", "put", "patch", "delete")


@dataclass(frozen=True)
class Route:
    route: str  # e.g. "api/v1/organizations/<slug:organization>/keys/"
    name: str | None
    params: frozenset[str]

    @property
    def key(self) -> str:
        return self.name or self.route


def _params(pattern: Any) -> set[str]:
    return set(pattern.pattern.regex.groupindex)


def _walk(patterns: list[Any], prefix: str, params: set[str]) -> Iterator[Route]:
    for pattern in patterns:
        if isinstance(pattern, URLResolver):
            yield from _walk(
                pattern.url_patterns, prefix + str(pattern.pattern), params | _params(pattern)
            )
        elif isinstance(pattern, URLPattern):
            yield Route(
                route=prefix + str(pattern.pattern),
                name=pattern.name,
                params=frozenset(params | _params(pattern)),
            )


def routes_with_parameters() -> list[Route]:
    return [
        route
        for route in _walk(get_resolver().url_patterns, "", set())
        if route.params and not any(route.route.startswith(p) for p in EXEMPT)
    ]


def test_every_route_with_a_parameter_is_in_the_matrix():
    routes = routes_with_parameters()
    uncovered = sorted(route.key for route in routes if route.key not in OBJECTS)

    assert uncovered == [], (
        "routes with parameters missing from the cross-tenant matrix (add them to OBJECTS, or "
        f"to EXEMPT with the reason): {uncovered}"
    )
    assert sorted(set(OBJECTS) - {route.key for route in routes}) == [], "stale OBJECTS entries"


def test_the_matrix_notices_a_new_route(settings):
    """The coverage check itself can fail: a route added to the URLconf is caught."""
    settings.ROOT_URLCONF = "tests.cross_tenant_urls"
    from django.urls import clear_url_caches

    clear_url_caches()
    try:
        uncovered = [r.key for r in routes_with_parameters() if r.key not in OBJECTS]
    finally:
        clear_url_caches()
    assert uncovered == ["new_thing"]


@pytest.fixture
def world(db) -> World:
    acme = make_org(name="Acme", credit_usd="20")
    rival = make_org(name="Rival", credit_usd="5")
    alice = Membership.objects.get(organization=acme)
    key, _ = api_key_create(organization=acme, name="acme-key", created_by=alice.user)
    make_usage(key)
    spend_cap_set(api_key=key, amount_usd=Decimal("3"), window=SpendCap.Window.DAY)
    token, _ = management_token_create(membership=alice, name="acme-token", role="owner")
    charlie = Membership.objects.get(organization=rival)
    _, charlie_token = management_token_create(membership=charlie, name="c", role="owner")
    bob = Membership.objects.create(
        organization=acme,
        user=User.objects.create_user("bob@acme.example"),
        role=Membership.Role.MEMBER,
    )
    invitation, _ = invitation_create(
        organization=acme,
        email="dave@example.com",
        role=Membership.Role.MEMBER,
        invited_by=alice.user,
        site_url="http://testserver",
    )
    statement = statement_issue(organization_id=acme.pk, period_start=date(2026, 10, 1))
    payment = CardPayment.objects.create(
        stripe_payment_intent_id="pi_acme",
        organization=acme,
        amount_usd=Decimal("10"),
        origin=CardPayment.Origin.DASHBOARD,
    )
    return World(
        acme=acme,
        rival=rival,
        key=key,
        token=token,
        charlie_token=charlie_token,
        bob=bob,
        invitation=invitation,
        statement=statement,
        payment=payment,
    )


def snapshot() -> dict[str, object]:
    """Everything a cross-tenant call could change."""
    return {
        "organizations": sorted(Organization.objects.values_list("pk", "name", "slug")),
        "memberships": sorted(Membership.objects.values_list("organization_id", "user_id", "role")),
        "keys": sorted(
            ApiKey.objects.values_list(
                "pk",
                "organization_id",
                "name",
                "revoked_at",
                "expires_at",
                "requests_per_minute",
                "tokens_per_minute",
                "max_concurrent_requests",
            )
        ),
        "tokens": sorted(
            ManagementToken.objects.values_list("pk", "organization_id", "role", "revoked_at")
        ),
        "balances": sorted(Account.objects.values_list("pk", "balance_usd", "reserved_usd")),
        "transactions": LedgerTransaction.objects.count(),
        "usage": UsageRecord.objects.count(),
        "invitations": sorted(Invitation.objects.values_list("pk", "state")),
        "statements": Statement.objects.count(),
        "payments": sorted(CardPayment.objects.values_list("pk", "status")),
        "spend_caps": sorted(SpendCap.objects.values_list("api_key_id", "amount_usd", "window")),
        "ip_allowlists": sorted(ApiKey.objects.values_list("pk", "ip_allowlist")),
    }


def _callers(world: World, route: Route) -> dict[str, Client]:
    session = Client()
    session.force_login(Membership.objects.get(organization=world.rival).user)
    callers = {"session": session}
    if route.route.startswith("api/"):
        callers["token"] = Client(HTTP_AUTHORIZATION=f"Bearer {world.charlie_token}")
    return callers


def _variants(world: World, route: Route) -> list[dict[str, Any]]:
    acme_params = OBJECTS[route.key](world)
    variants = [acme_params]
    if "organization" in acme_params and len(acme_params) > 1:
        # Charlie's own organisation in the path, with Acme's object ids.
        variants.append({**acme_params, "organization": world.rival.slug})
    return variants


@pytest.mark.parametrize("route", routes_with_parameters(), ids=lambda r: r.key)
def test_another_organisations_member_gets_404_and_changes_nothing(world, route):
    before = snapshot()
    for params in _variants(world, route):
        url = reverse(route.name, kwargs=params) if route.name else None
        assert url is not None, f"give {route.route} a name"
        for caller, client in _callers(world, route).items():
            statuses = {}
            for method in METHODS:
                response = getattr(client, method)(url, content_type="application/json")
                statuses[method] = response.status_code
            refused = {code for code in statuses.values() if code in (403, 404)}
            assert set(statuses.values()) <= {403, 404, 405} and refused, (
                f"{caller} {url}: {statuses}"
            )
    assert snapshot() == before


def query_scoped_pages() -> list[str]:
    """Every named dashboard route without a path parameter, but the exempt ones."""
    return sorted(
        route.name
        for route in _walk(get_resolver().url_patterns, "", set())
        if route.route.startswith("dashboard/")
        and not route.params
        and route.name
        and route.name not in QUERY_EXEMPT
    )


def test_the_query_scoped_pages_are_found():
    """The generated list is not empty and holds the pages known to take `?org=`."""
    assert {"dashboard", "usage", "usage_log", "organization", "add_credit"} <= set(
        query_scoped_pages()
    )


@pytest.mark.parametrize("name", query_scoped_pages())
def test_another_organisations_slug_in_the_query_is_a_404(world, name):
    session = Client()
    session.force_login(Membership.objects.get(organization=world.rival).user)
    before = snapshot()

    for method in ("get", "post"):
        response = getattr(session, method)(f"{reverse(name)}?org={world.acme.slug}")
        assert response.status_code in (404, 405), (name, method, response.status_code)

    assert snapshot() == before


def test_the_matrix_catches_a_leak(world, monkeypatch):
    """If a view fetched by id alone, the matrix would fail: prove it with a leaky selector."""
    from portal import api as portal_api

    monkeypatch.setattr(
        portal_api, "api_key_or_404", lambda membership, key_id: ApiKey.objects.get(pk=key_id)
    )
    route = next(r for r in routes_with_parameters() if r.key == "api_v1_key")

    with pytest.raises(AssertionError):
        test_another_organisations_member_gets_404_and_changes_nothing(world, route)
