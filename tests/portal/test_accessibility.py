"""Keyboard and screen-reader basics on every page a team uses, checked on the rendered HTML.

Each page: the document has a language, a "skip to content" link whose target exists, no
positive tabindex (which breaks the natural tab order), every visible form control has a label,
every button and link has a name, every image an alt text, and nothing is clickable that a
keyboard cannot reach (an onclick on a non-interactive element).
"""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

INTERACTIVE = {"a", "button", "input", "select", "textarea", "summary", "details", "label"}
LABELLED = {"input", "select", "textarea"}
NO_LABEL_NEEDED = {"hidden", "submit", "button", "reset", "image"}


class PageAudit(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.problems: list[str] = []
        self.lang = ""
        self.ids: set[str] = set()
        self.label_for: set[str] = set()
        self.controls: list[tuple[str, dict[str, str], bool]] = []  # tag, attrs, inside a label
        self.skip_target = ""
        self._label_depth = 0
        self._open: list[tuple[str, dict[str, str], list[str]]] = []  # buttons and links

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attrs_list}
        if tag == "html":
            self.lang = attrs.get("lang", "")
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "label":
            self._label_depth += 1
            if "for" in attrs:
                self.label_for.add(attrs["for"])
        if tag == "a" and "skip" in attrs.get("class", "").split() and not self.skip_target:
            self.skip_target = attrs.get("href", "").lstrip("#")
        tabindex = attrs.get("tabindex", "")
        if tabindex.lstrip("-").isdigit() and int(tabindex) > 0:
            self.problems.append(f"positive tabindex on <{tag}>")
        if "onclick" in attrs and tag not in INTERACTIVE:
            self.problems.append(f"onclick on a <{tag}>, which a keyboard cannot reach")
        if tag == "img" and "alt" not in attrs:
            self.problems.append(f"<img src={attrs.get('src')!r}> without alt")
        if tag in LABELLED and attrs.get("type", "text") not in NO_LABEL_NEEDED:
            self.controls.append((tag, attrs, self._label_depth > 0))
        if tag in {"button", "a"}:
            self._open.append((tag, attrs, []))

    def handle_endtag(self, tag: str) -> None:
        if tag == "label":
            self._label_depth -= 1
        if tag in {"button", "a"} and self._open and self._open[-1][0] == tag:
            _, attrs, text = self._open.pop()
            if not "".join(text).strip() and not attrs.get("aria-label"):
                self.problems.append(f"<{tag} {attrs}> has no text for a screen reader")

    def handle_data(self, data: str) -> None:
        for _, _, text in self._open:
            text.append(data)

    def audit(self) -> list[str]:
        problems = list(self.problems)
        if not self.lang:
            problems.append("<html> has no lang")
        if not self.skip_target or self.skip_target not in self.ids:
            problems.append(f"no skip link to an existing target (#{self.skip_target})")
        for tag, attrs, inside_label in self.controls:
            named = (
                inside_label
                or attrs.get("id", "\0") in self.label_for
                or attrs.get("aria-label")
                or attrs.get("aria-labelledby")
            )
            if not named:
                problems.append(f"<{tag} name={attrs.get('name')!r}> has no label")
        return problems


def audit(html: str) -> list[str]:
    parser = PageAudit()
    parser.feed(html)
    return parser.audit()


def test_the_audit_notices_an_unlabelled_field_and_a_missing_skip_link():
    """The checker itself can fail."""
    page = '<html lang="en"><body><form><input name="q"></form><main id="main"></main></body>'

    assert audit(page) == [
        "no skip link to an existing target (#)",
        "<input name='q'> has no label",
    ]


PAGES = [
    "/dashboard/",
    "/dashboard/keys/{key}/",
    "/dashboard/org/",
    "/dashboard/orgs/",
    "/dashboard/tokens",
    "/dashboard/usage/",
    "/dashboard/usage/log",
    "/dashboard/statements/",
    "/dashboard/statements/{statement}/",
    "/dashboard/credit/",
    "/catalog/",
    "/",
]


@pytest.mark.parametrize("path", PAGES)
def test_each_signed_in_page_is_usable_by_keyboard_and_screen_reader(acme_pages, path):
    client, ids = acme_pages

    response = client.get(path.format(**ids), {"org": ids["org"]})

    assert response.status_code == 200
    assert audit(response.content.decode()) == []


@pytest.mark.parametrize(
    "path", ["/accounts/login/", "/accounts/signup/", "/accounts/password/reset/"]
)
def test_each_account_page_is_usable_by_keyboard_and_screen_reader(client, db, path):
    response = client.get(path)

    assert response.status_code == 200
    assert audit(response.content.decode()) == []


def test_the_new_key_page_and_its_copy_button_are_usable_by_keyboard(acme_pages):
    client, ids = acme_pages

    response = client.post("/dashboard/keys/create", {"name": "new", "org": ids["org"]})

    assert response.status_code == 200
    html = response.content.decode()
    assert audit(html) == []
    assert '<button type="button" id="copy-secret">Copy</button>' in html
    assert 'role="status"' in html  # the result of copying is announced
