"""Log lines carry the request id, and never a key, a secret or a body."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from portal.logs import JsonFormatter, RequestIdFilter
from tests.conftest import FAKE_PROVIDER_SECRET
from tests.factories import make_key, make_org
from tests.servers import REPO, child_database_url
from tests.services import free_port, wait_for_port

PROMPT = "my secret plan is to paint the moon purple"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Every record of the process, at DEBUG, written as LOG_FORMAT=json writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_it_logs_a_failed_request_with_its_id_and_without_key_or_prompt(
    gateway_url, catalog, fake_provider, json_log
):
    _, key = make_key(make_org(credit_usd="10"))
    fake_provider.fail_next(500)

    response = httpx.post(
        f"{gateway_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "fake-small", "messages": [{"role": "user", "content": PROMPT}]},
    )

    assert response.status_code == 502
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    request_id = response.headers["x-request-id"]
    ours = [line for line in lines if line["request_id"] == request_id]
    assert any("provider fake answered HTTP 500" in line["message"] for line in ours)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    captured = json_log.getvalue()
    assert key not in captured
    assert key[:12] not in captured
    assert PROMPT not in captured
    assert FAKE_PROVIDER_SECRET not in captured


def test_it_gives_each_page_request_an_id(gateway_server):
    first = httpx.get(f"{gateway_server.url}/accounts/login/")
    second = httpx.get(f"{gateway_server.url}/accounts/login/")
    assert first.status_code == 200
    assert first.headers["x-request-id"].startswith("req_")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_log_format_json_writes_one_object_a_line():
    script = (
        "import django, logging; django.setup(); "
        "from portal.logs import bind_request_id; bind_request_id('req_abc'); "
        "logging.getLogger('switchboard.test').warning('hello %s', 'world')"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", "LOG_FORMAT": "json"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stderr.strip().splitlines()[-1])
    assert line["message"] == "hello world"
    assert line["request_id"] == "req_abc"
    assert line["level"] == "WARNING"


def test_it_refuses_an_unknown_log_format():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", "LOG_FORMAT": "xml"}
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "LOG_FORMAT must be text or json" in result.stderr


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("flags", "access_lines"), [(["--no-access-log"], 0), ([], 2)])
def test_uvicorn_writes_access_lines_only_when_its_command_line_asks(flags, access_lines):
    # LOGGING formats uvicorn's access lines as ours; it must not bring them back under
    # --no-access-log (the Dockerfile's and `make run`'s), where each cost the gateway CPU.
    port = free_port()
    env = {**os.environ, "DATABASE_URL": child_database_url(), "LOG_FORMAT": "json"}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "portal.asgi:application", "--port", str(port), *flags],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port)
        for _ in range(2):
            assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=20)

    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert len(lines) > 0, stderr  # uvicorn's own start-up lines, in our format
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert len(access) == access_lines, stderr
    assert all("GET /healthz" in line["message"] for line in access)
