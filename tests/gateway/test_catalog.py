from __future__ import annotations

import copy
import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from gateway.models import Model, ModelAlias, Provider, Route
from gateway.services import CatalogError, catalog_load

pytestmark = pytest.mark.django_db

REPO = Path(__file__).resolve().parents[2]

CATALOG: dict[str, Any] = {
    "providers": [
        {
            "name": "local",
            "kind": "openai",
            "base_url": "http://127.0.0.1:9001/v1/",
            "api_key_env": "LOCAL_KEY",
        },
        {"name": "backup", "kind": "openai", "base_url": "http://127.0.0.1:9002/v1"},
    ],
    "models": [
        {
            "name": "fake-small",
            "routes": [
                {"provider": "local", "upstream_model": "fake-small"},
                {"provider": "backup", "upstream_model": "fake-small-b"},
            ],
            "price": {"input": "0.50", "output": "1.50"},
        }
    ],
}


def test_it_creates_providers_models_routes_and_exact_prices():
    report = catalog_load(data=CATALOG)

    assert report.created == ["provider local", "provider backup", "model fake-small"]
    model = Model.objects.get(name="fake-small")
    assert model.input_price_per_mtok_usd == Decimal("0.50")
    assert model.output_price_per_mtok_usd == Decimal("1.50")
    assert list(model.routes.values_list("provider__name", "upstream_model", "position")) == [
        ("local", "fake-small", 0),
        ("backup", "fake-small-b", 1),
    ]
    assert Provider.objects.get(name="local").base_url == "http://127.0.0.1:9001/v1"


def test_loading_twice_changes_nothing():
    catalog_load(data=CATALOG)
    route_ids = list(Route.objects.values_list("pk", flat=True))

    report = catalog_load(data=CATALOG)

    assert report.created == report.updated == []
    assert len(report.unchanged) == 3
    assert list(Route.objects.values_list("pk", flat=True)) == route_ids


def test_it_updates_in_place_and_keeps_what_the_file_no_longer_names():
    catalog_load(data=CATALOG)
    changed = copy.deepcopy(CATALOG)
    changed["models"][0]["price"]["output"] = "2.00"
    changed["models"][0]["routes"] = [{"provider": "backup", "upstream_model": "fake-small-b"}]
    del changed["providers"][0]

    report = catalog_load(data=changed)

    assert report.updated == ["model fake-small"]
    assert report.not_in_file == ["provider local"]
    assert Provider.objects.filter(name="local").exists()
    model = Model.objects.get(name="fake-small")
    assert model.output_price_per_mtok_usd == Decimal("2.00")
    assert list(model.routes.values_list("provider__name", flat=True)) == ["backup"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["models"][0]["price"].update(input=0.5), "float"),
        (lambda c: c["models"][0]["price"].update(input="-1"), "negative"),
        (lambda c: c["models"][0]["price"].pop("output"), "price.output"),
        (lambda c: c["models"][0]["routes"][0].update(provider="nope"), "'nope' is not in"),
        (lambda c: c["models"][0].update(routes=[]), "at least one route"),
        (lambda c: c["providers"][0].update(kind="azure"), "kind must be one of"),
        (lambda c: c["providers"][0].update(base_url="ftp://x"), "base_url"),
        (lambda c: c["models"].append(copy.deepcopy(c["models"][0])), "defined twice"),
        (lambda c: c["models"][0].update(routing="random"), "routing must be one of"),
        (lambda c: c["models"][0]["routes"][0].update(weight=-1), "weight"),
        (
            lambda c: c["models"][0]["routes"][0].update(timeouts={"read": 3}),
            "timeouts may only set",
        ),
        (
            lambda c: c["models"][0]["routes"][0].update(timeouts={"idle": 0}),
            "timeouts.idle must be a positive",
        ),
        (
            lambda c: (
                c["models"][0].update(routing="weighted"),
                [route.update(weight=0) for route in c["models"][0]["routes"]],
            ),
            "a route of weight 1 or more",
        ),
        (lambda c: c["models"][0].update(aliases="small"), "aliases must be a list"),
        (lambda c: c["models"][0].update(aliases=["fake-small"]), "is the name of a model"),
        (
            lambda c: (
                c["models"].append(
                    {**copy.deepcopy(c["models"][0]), "name": "other", "aliases": ["s"]}
                )
                or c["models"][0].update(aliases=["s"])
            ),
            "used twice",
        ),
        # Longer or larger than the column holding it: refused by name, not a DataError.
        (lambda c: c["models"][0].update(name="m" * 201), r"models\[0\]\.name.*at most 200"),
        (
            lambda c: c["models"][0]["routes"][0].update(upstream_model="u" * 201),
            r"routes\[0\]\.upstream_model.*at most 200",
        ),
        (lambda c: c["models"][0].update(aliases=["a" * 201]), r"aliases.*at most 200"),
        (
            lambda c: (
                c["providers"][0].update(name="p" * 101),
                c["models"][0]["routes"][0].update(provider="p" * 101),
            ),
            r"providers\[0\]\.name.*at most 100",
        ),
        (
            lambda c: c["providers"][0].update(api_key_env="K" * 101),
            r"providers\[0\]\.api_key_env.*at most 100",
        ),
        (
            lambda c: c["providers"][0].update(base_url="http://x/" + "p" * 500),
            r"providers\[0\]\.base_url.*at most 500",
        ),
        (lambda c: c["models"][0].update(context_length=2**31), "context_length.*at most"),
        (lambda c: c["models"][0].update(max_output_tokens=2**31), "max_output_tokens.*at most"),
        (lambda c: c["models"][0].update(image_tokens=2**31), "image_tokens.*at most"),
        (lambda c: c["models"][0]["routes"][0].update(weight=2**31), "weight.*at most"),
    ],
)
def test_an_invalid_catalog_names_the_entry_and_changes_nothing(mutate, message):
    bad = copy.deepcopy(CATALOG)
    mutate(bad)

    with pytest.raises(CatalogError, match=message):
        catalog_load(data=bad)

    assert not Provider.objects.exists()
    assert not Model.objects.exists()


ROUTED: dict[str, Any] = {
    **CATALOG,
    "models": [
        {
            **CATALOG["models"][0],
            "routing": "weighted",
            "aliases": ["small", "fs"],
            "routes": [
                {
                    "provider": "local",
                    "upstream_model": "fake-small",
                    "weight": 3,
                    "timeouts": {"connect": 2, "first_byte": 15.5, "idle": 30},
                },
                {"provider": "backup", "upstream_model": "fake-small-b", "weight": 0},
            ],
        }
    ],
}


def test_it_loads_weights_timeouts_routing_and_aliases():
    catalog_load(data=ROUTED)

    model = Model.objects.get(name="fake-small")
    assert model.routing == Model.Routing.WEIGHTED
    assert list(
        model.routes.values_list(
            "upstream_model",
            "weight",
            "connect_timeout_seconds",
            "first_byte_timeout_seconds",
            "idle_timeout_seconds",
        )
    ) == [("fake-small", 3, 2.0, 15.5, 30.0), ("fake-small-b", 0, None, None, None)]
    assert sorted(model.aliases.values_list("name", flat=True)) == ["fs", "small"]

    again = catalog_load(data=ROUTED)
    assert again.updated == []


def test_an_alias_moves_with_the_file_and_never_names_two_models():
    catalog_load(data=ROUTED)
    moved = copy.deepcopy(ROUTED)
    moved["models"][0]["aliases"] = ["fs"]
    moved["models"].append(
        {**copy.deepcopy(CATALOG["models"][0]), "name": "fake-large", "aliases": ["small"]}
    )

    report = catalog_load(data=moved)

    assert "model fake-small" in report.updated
    assert dict(ModelAlias.objects.values_list("name", "model__name")) == {
        "fs": "fake-small",
        "small": "fake-large",
    }
    # An alias held by a model the file does not name is not taken over silently.
    orphan = {**copy.deepcopy(CATALOG), "models": [{**CATALOG["models"][0], "name": "new"}]}
    orphan["models"][0]["aliases"] = ["small"]
    with pytest.raises(CatalogError, match="already names model fake-large"):
        catalog_load(data=orphan)


def run_manage(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args], cwd=REPO, capture_output=True, text=True, check=False
    )


def test_the_example_catalog_loads(tmp_path):
    # Through the real command and an embedded SQLite database, as `make run` does.
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    for args in (["migrate", "--no-input"], ["load_catalog", "catalog.example.yaml"]):
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    assert "created: model gpt-4o-mini" in result.stdout


def test_unquoted_yaml_prices_are_read_exactly(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(
        "providers:\n  - {name: p, kind: demo}\n"
        "models:\n  - name: m\n    routes: [{provider: p, upstream_model: m}]\n"
        "    price: {input: 0.1, output: 0.3}\n"
    )
    call_command("load_catalog", str(path))

    assert Model.objects.get(name="m").input_price_per_mtok_usd == Decimal("0.1")


def test_a_bad_file_exits_non_zero_with_one_line(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text("providers: [")
    result = run_manage("load_catalog", str(path))

    assert result.returncode != 0
    assert "not valid YAML" in result.stderr
    assert "Traceback" not in result.stderr
