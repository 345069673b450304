"""Fixtures shared by the tests that run the gateway against the fake Anthropic and Gemini
upstreams: the fake served once per module, reset for each test with its key set, and a catalog
whose one model routes to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from tests.fakes.base import FakeUpstream

_Fake = TypeVar("_Fake", bound=FakeUpstream)


def fake_upstream_fixtures(
    name: str, start: Callable[[], _Fake], *, key_env: str, secret: str
) -> tuple[Any, Any]:
    """Two fixtures for a test module to assign at its top level: a module-scoped server
    (`_<name>_server`) and the fixture `name`, the fake reset for the test, with `secret` set in
    `key_env` (the variable the catalog names)."""
    server_name = f"_{name}_server"

    @pytest.fixture(scope="module", name=server_name)
    def server() -> Iterator[_Fake]:
        with start() as fake:
            yield fake

    @pytest.fixture(name=name)
    def fake(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> _Fake:
        upstream: _Fake = request.getfixturevalue(server_name)
        upstream.reset()
        monkeypatch.setenv(key_env, secret)
        return upstream

    return server, fake


def upstream_catalog(
    *,
    provider: str,
    kind: str,
    base_url: str,
    key_env: str,
    model: str,
    upstream_models: list[str],
    price: dict[str, str],
) -> dict[str, Any]:
    """A catalog with one provider and one model routed to it, in order, once per
    `upstream_models` (several: failover between deployments of one provider)."""
    return {
        "providers": [
            {"name": provider, "kind": kind, "base_url": base_url, "api_key_env": key_env}
        ],
        "models": [
            {
                "name": model,
                "routes": [
                    {"provider": provider, "upstream_model": upstream}
                    for upstream in upstream_models
                ],
                "price": price,
            }
        ],
    }
