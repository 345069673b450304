"""The production settings path: `check --deploy` is clean with DEBUG off."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.servers import REPO

PRODUCTION_ENV = {
    "DEBUG": "false",
    "SECRET_KEY": "k3Jq9vXw2LmN8pRt5YzA7bCd4EfGh6IjKl1MnOp0QrSt9UvWxYz2AbCdEfGhIjKlMn",
    "ALLOWED_HOSTS": "switchboard.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://switchboard.example.com",
    "SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
}


def deploy_check(**overrides: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **PRODUCTION_ENV, **overrides}
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_it_passes_the_deploy_check_with_production_settings():
    result = deploy_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_it_fails_the_deploy_check_when_an_operator_turns_hsts_off():
    # Proves the check runs against these settings: a weakened setting is reported.
    result = deploy_check(SECURE_HSTS_SECONDS="0")
    assert result.returncode != 0
    assert "security.W004" in result.stdout + result.stderr


def test_it_refuses_to_start_without_a_secret_key_when_debug_is_off():
    result = deploy_check(SECRET_KEY="")
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr
