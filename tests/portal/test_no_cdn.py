"""No page loads anything from another host at run time: scripts, styles, fonts and images
are the app's own static files (ServeStatic serves them), and each one is really there."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from tests.portal.test_accessibility import PAGES

ASSET = re.compile(r'<(?:script|link|img)\b[^>]*?\b(?:src|href)="([^"]+)"')


def test_the_check_finds_every_asset_a_page_loads():
    page = '<script src="https://cdn.example.com/uplot.js"></script><link href="/static/a.css">'

    assert ASSET.findall(page) == ["https://cdn.example.com/uplot.js", "/static/a.css"]


ANONYMOUS_PAGES = [
    "/accounts/login/",
    "/api/v1/docs/",
    "/api/v1/redoc/",
]  # a signed-in user is sent elsewhere


@pytest.mark.parametrize("path", [*PAGES, *ANONYMOUS_PAGES])
def test_every_asset_of_the_page_is_served_by_the_app(acme_pages, settings, path):
    signed_in, ids = acme_pages
    # Static files from the apps' folders, as `make run` collects them; ServeStatic reads the
    # setting when a client builds its middleware, so this test uses a client of its own.
    settings.SERVESTATIC_USE_FINDERS = True
    client = Client()
    if path not in ANONYMOUS_PAGES:
        client.cookies = signed_in.cookies

    html = client.get(path.format(**ids), {"org": ids["org"]}).content.decode()

    assert ASSET.findall(html), f"{path} loads no assets at all: is the check still right?"
    for asset in ASSET.findall(html):
        assert asset.startswith("/"), f"{path} loads {asset} from another host"
        if asset.startswith("/static/"):
            response = client.get(asset)
            assert response.status_code == 200, f"{path}: {asset}"
