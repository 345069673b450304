"""Sign-up, e-mail verification, login and password reset (django-allauth)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import pytest
from allauth.account.models import EmailAddress
from allauth.mfa.models import Authenticator
from allauth.mfa.totp.internal import auth as totp_auth

from portal.models import Membership, User
from tests.factories import make_org

PASSWORD = "a long enough passphrase 42"


def _link_in(message) -> str:
    match = re.search(r"http://testserver(/\S+)", message.body)
    assert match, message.body
    return match.group(1)


def _make_verified_user(email: str) -> User:
    user = User.objects.create_user(email=email, password=PASSWORD)
    EmailAddress.objects.create(user=user, email=email, primary=True, verified=True)
    return user


@pytest.mark.django_db
def test_it_signs_up_verifies_the_address_and_makes_a_personal_organisation(client, mailoutbox):
    other = make_org()  # another organisation: the new user must not land in it

    response = client.post(
        "/accounts/signup/",
        {"email": "alice@example.com", "password1": PASSWORD, "password2": PASSWORD},
    )

    assert response.status_code == 302
    assert client.get("/dashboard/").status_code == 302  # not logged in before verifying
    assert len(mailoutbox) == 1
    assert mailoutbox[0].to == ["alice@example.com"]
    confirm_url = _link_in(mailoutbox[0])
    assert client.get(confirm_url).status_code == 200  # a page with a button: scanners can't
    response = client.post(confirm_url)
    assert response.status_code == 302

    user = User.objects.get(email="alice@example.com")
    assert EmailAddress.objects.get(user=user).verified
    membership = Membership.objects.get(user=user)
    assert membership.role == Membership.Role.OWNER
    assert membership.organization != other
    dashboard = client.get("/dashboard/")
    assert dashboard.status_code == 200
    assert dashboard.context["organization"] == membership.organization


@pytest.mark.django_db
def test_it_refuses_a_wrong_password(client):
    _make_verified_user("bob@example.com")

    response = client.post(
        "/accounts/login/", {"login": "bob@example.com", "password": "not the password"}
    )

    assert response.status_code == 200
    assert not response.wsgi_request.user.is_authenticated
    assert client.get("/dashboard/").status_code == 302


@pytest.mark.django_db
def test_it_logs_in_by_email_and_out(client):
    _make_verified_user("carol@example.com")

    response = client.post("/accounts/login/", {"login": "carol@example.com", "password": PASSWORD})

    assert response.status_code == 302
    assert response.wsgi_request.user.is_authenticated
    client.post("/accounts/logout/")
    assert client.get("/dashboard/").status_code == 302


@pytest.mark.django_db
def test_it_resets_a_password_by_email(client, mailoutbox):
    user = _make_verified_user("dave@example.com")

    response = client.post("/accounts/password/reset/", {"email": "dave@example.com"})

    assert response.status_code == 302
    assert len(mailoutbox) == 1
    assert mailoutbox[0].to == ["dave@example.com"]
    reset_url = client.get(_link_in(mailoutbox[0]))["Location"]  # the key moves to the session
    new_password = "another long passphrase 43"
    response = client.post(reset_url, {"password1": new_password, "password2": new_password})
    assert response.status_code == 302
    user.refresh_from_db()
    assert user.check_password(new_password)


@pytest.mark.django_db
def test_an_owner_made_by_the_operator_cli_sets_a_password_then_verifies_and_logs_in(
    client, mailoutbox
):
    organization = make_org()
    owner = Membership.objects.get(organization=organization).user
    assert not owner.has_usable_password()

    client.post("/accounts/password/reset/", {"email": owner.email})
    reset_url = client.get(_link_in(mailoutbox[0]))["Location"]
    client.post(reset_url, {"password1": PASSWORD, "password2": PASSWORD})
    response = client.post("/accounts/login/", {"login": owner.email, "password": PASSWORD})

    # The address was never verified: the first login sends the verification e-mail.
    assert response["Location"] == "/accounts/confirm-email/"
    assert not response.wsgi_request.user.is_authenticated
    verification = next(m for m in mailoutbox if "confirm-email" in m.body)
    client.post(_link_in(verification))
    assert client.get("/dashboard/").context["organization"] == organization


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path", ["/accounts/signup/", "/accounts/login/", "/accounts/password/reset/"]
)
def test_the_account_pages_use_the_site_layout(client, path):
    response = client.get(path)

    assert response.status_code == 200
    page = response.content.decode()
    assert "portal/site.css" in page
    assert 'name="csrfmiddlewaretoken"' in page


@pytest.mark.django_db
def test_it_locks_an_address_out_after_five_failed_logins(client):
    email = f"erin-{uuid.uuid4().hex[:8]}@example.com"  # its own rate-limit counter
    _make_verified_user(email)

    for _ in range(5):
        client.post("/accounts/login/", {"login": email, "password": "guess"})
    response = client.post("/accounts/login/", {"login": email, "password": PASSWORD})

    assert not response.wsgi_request.user.is_authenticated
    assert "Too many failed login attempts" in response.content.decode()


def _totp_now(secret: str) -> str:
    """The current code, computed with allauth's own RFC 6238 implementation."""
    counter = int(time.time()) // 30
    return totp_auth.format_hotp_value(totp_auth.hotp_value(secret, counter))


@pytest.mark.django_db
def test_with_totp_turned_on_logging_in_needs_the_code(client, settings):
    # One period either side, so a period boundary between computing and checking cannot flake.
    settings.MFA_TOTP_TOLERANCE = 1
    email = f"frank-{uuid.uuid4().hex[:8]}@example.com"
    user = _make_verified_user(email)
    client.post("/accounts/login/", {"login": email, "password": PASSWORD})
    # Turning two-factor on is sensitive: allauth asks for the password again first.
    assert client.get("/accounts/2fa/totp/activate/")["Location"].startswith(
        "/accounts/reauthenticate/"
    )
    client.post("/accounts/reauthenticate/", {"password": PASSWORD})

    activate_page = client.get("/accounts/2fa/totp/activate/")
    assert activate_page.status_code == 200
    assert "portal/site.css" in activate_page.content.decode()  # in the site's layout
    secret = client.session["mfa.totp.secret"]
    activated = client.post("/accounts/2fa/totp/activate/", {"code": _totp_now(secret)})
    assert activated.status_code == 302
    assert Authenticator.objects.filter(user=user, type=Authenticator.Type.TOTP).exists()
    client.post("/accounts/logout/")

    response = client.post("/accounts/login/", {"login": email, "password": PASSWORD})

    assert response["Location"] == "/accounts/2fa/authenticate/"
    assert client.get("/dashboard/").status_code == 302  # the password alone is not enough
    wrong = client.post("/accounts/2fa/authenticate/", {"code": "000000"})
    assert wrong.status_code == 200
    assert not wrong.wsgi_request.user.is_authenticated
    right = client.post("/accounts/2fa/authenticate/", {"code": _totp_now(secret)})
    assert right.status_code == 302
    assert client.get("/dashboard/").status_code == 200


@pytest.mark.django_db
def test_without_totp_the_password_is_enough(client):
    email = f"gina-{uuid.uuid4().hex[:8]}@example.com"
    _make_verified_user(email)

    response = client.post("/accounts/login/", {"login": email, "password": PASSWORD})

    assert response["Location"] == "/dashboard/"


@pytest.mark.parametrize(
    ("email_host", "backend"),
    [
        ("", "django.core.mail.backends.console.EmailBackend"),
        ("smtp.example.com", "django.core.mail.backends.smtp.EmailBackend"),
    ],
)
def test_e_mail_goes_to_the_console_unless_an_smtp_host_is_configured(email_host, backend):
    # The settings module is read in a fresh interpreter, as at start-up.
    env = {**os.environ, "EMAIL_HOST": email_host}
    out = subprocess.run(
        [sys.executable, "-c", "import portal.settings as s; print(s.EMAIL_BACKEND)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    assert out == backend
