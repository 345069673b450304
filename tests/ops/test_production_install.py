"""The production image, without Docker: what the Dockerfile copies, installed as it installs
it (`pip install .`: no dev extras, so nothing the tests' own packages happen to provide),
static files collected at build time, then each process compose.yaml runs, started with
compose.yaml's environment against the suite's PostgreSQL and Redis (Redis as the broker).

The suite's own virtualenv cannot show a dependency missing from pyproject.toml: a dev tool
may pull it in. That is how the image's Celery worker and beat came to crash at start
(`No module named 'packaging'`, needed by kombu's Redis transport and only pulled in by its
`redis` extra) while every other test passed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from tests.factories import make_key, make_org
from tests.ops.process_files import (
    COMPOSE,
    dockerfile_command,
    dockerfile_env,
    dockerfile_instructions,
)
from tests.servers import REPO, child_database_url
from tests.services import free_port, is_listening

IMAGE_ROOT = "/app"  # the Dockerfile's WORKDIR, where its paths point
PROMETHEUS_ROOT = "/tmp/prometheus"  # noqa: S108 (the image's metrics folder; its CMD empties it)
START_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class Image:
    app: Path  # the image's /app
    bin: Path  # its Python's scripts (python, uvicorn, celery)
    build_env: dict[str, str]  # the Dockerfile's ENV
    command: str  # the Dockerfile's CMD (a shell command line)
    services: dict[str, dict[str, object]]  # compose.yaml's services, anchors resolved


def _in_image(value: str, app: Path) -> str:
    """A path of the image's, inside this test's copy of it (`app` is its /app)."""
    for root, here in ((IMAGE_ROOT, app), (PROMETHEUS_ROOT, app.parent / "prometheus")):
        value = value.replace(root, str(here))
    return value


def _build(workdir: Path) -> Image:
    """The Dockerfile's COPY, ENV, RUN pip and collectstatic, and CMD, into `workdir`."""
    app = workdir / "app"
    app.mkdir()
    for instruction, arguments in dockerfile_instructions():
        if instruction != "COPY":
            continue
        *sources, target = arguments.split()
        for source in sources:
            destination = app / target / source if target.endswith("/") else app / target
            if (REPO / source).is_dir():
                shutil.copytree(
                    REPO / source, destination, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy(REPO / source, destination)
    build_env = {name: _in_image(value, app) for name, value in dockerfile_env().items()}
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    # pip keeps the machine's configuration (its package index); nothing of the suite's venv.
    pip_env = {k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH"}}
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "."],
        cwd=app,
        env=pip_env,
        check=True,
        timeout=600,
    )
    build_env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    (workdir / "prometheus").mkdir()
    subprocess.run(
        [str(bin_dir / "python"), "manage.py", "collectstatic", "--no-input", "--verbosity", "0"],
        cwd=app,
        env=build_env,
        check=True,
        timeout=120,
    )
    command = _in_image(dockerfile_command(), app)
    return Image(app, bin_dir, build_env, command, COMPOSE["services"])


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return _build(tmp_path_factory.mktemp("image"))


def _interpolated(value: str, variables: dict[str, str]) -> str:
    """compose's `${NAME}`, `${NAME:-default}` and `${NAME:?error}`."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3) or ""
        if variables.get(name):
            return variables[name]
        if operator == ":?":
            raise AssertionError(f"compose.yaml needs {name}: {argument}")
        return argument

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def _runtime_env(image: Image, service: str) -> dict[str, str]:
    """compose.yaml's environment for `service` with an operator's required values set, its
    services' addresses replaced by the suite's own, and its paths put inside the image."""
    operator = {
        "SECRET_KEY": "k3Jq9vXw2LmN8pRt5YzA7bCd4EfGh6IjKl1MnOp0QrSt9UvWxYz2AbCdEfGhIjKlMn",
        "ALLOWED_HOSTS": "switchboard.example.com",
    }
    declared = image.services[service]["environment"]
    assert isinstance(declared, dict)
    env = {name: _interpolated(str(value), operator) for name, value in declared.items()}
    env["DATABASE_URL"] = child_database_url()
    env["REDIS_URL"] = os.environ["REDIS_URL"]
    # The broker on a Redis database of its own, as compose.yaml gives it one.
    env["CELERY_BROKER_URL"] = urlunsplit(urlsplit(os.environ["REDIS_URL"])._replace(path="/13"))
    env["PROMETHEUS_MULTIPROC_DIR"] = _in_image(env["PROMETHEUS_MULTIPROC_DIR"], image.app)
    return {**image.build_env, **env, "WEB_CONCURRENCY": "1"}


@pytest.fixture
def started(image: Image) -> Iterator[list[subprocess.Popen[str]]]:
    """Processes started by a test, stopped after it."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _start(
    started: list[subprocess.Popen[str]], image: Image, service: str, argv: list[str]
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        argv,
        cwd=image.app,
        env=_runtime_env(image, service),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    started.append(process)
    return process


def _wait_for_line(process: subprocess.Popen[str], pattern: str) -> None:
    """Wait until a line of the process's output matches `pattern`; fail with the output if
    the process exits first or the wait times out. The output is read to its end meanwhile,
    so the process never blocks on a full pipe."""
    assert process.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True)
    reader.start()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not any(re.search(pattern, line) for line in list(lines)):
        if process.poll() is not None or time.monotonic() > deadline:
            reader.join(timeout=5)
            raise AssertionError(f"no line matching {pattern!r}; the output:\n{''.join(lines)}")
        time.sleep(0.1)


def _wait_listening(process: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not is_listening(port):
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "the web service did not start"
        time.sleep(0.1)


def _compose_command(image: Image, service: str) -> list[str]:
    command = image.services[service]["command"]
    assert isinstance(command, list)
    return [str(part) for part in command]


@pytest.mark.django_db(transaction=True)
def test_the_migrate_service_runs(image):
    result = subprocess.run(
        _compose_command(image, "migrate"),
        cwd=image.app,
        env=_runtime_env(image, "migrate"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.django_db(transaction=True)
def test_the_web_service_serves_pages_static_files_and_the_api(image, started):
    port = free_port()
    command = image.command.replace("--host 0.0.0.0 --port 8000", f"--host 127.0.0.1 --port {port}")
    assert command != image.command, "the Dockerfile's CMD no longer serves on 0.0.0.0:8000"
    web = _start(started, image, "web", ["sh", "-c", command])
    _wait_listening(web, port)
    site = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Host": "switchboard.example.com", "X-Forwarded-Proto": "https"},
        timeout=30,
    )

    ready = site.get("/readyz")
    login = site.get("/accounts/login/")
    stylesheets = re.findall(r'href="(/static/[^"]+\.css)"', login.text)
    api = site.get("/v1/models")

    assert ready.json() == {"status": "ok", "database": "ok", "redis": "ok", "broker": "ok"}
    assert login.status_code == 200
    assert stylesheets, "the login page links no stylesheet"
    for stylesheet in stylesheets:
        assert site.get(stylesheet).status_code == 200, stylesheet
    assert api.status_code == 401
    assert api.json()["error"]["type"] == "authentication_error"


@pytest.mark.django_db(transaction=True)
def test_the_web_service_takes_the_client_address_from_the_proxys_header(image, started):
    # compose.yaml trusts X-Forwarded-For from whatever reaches web (FORWARDED_ALLOW_IPS=*),
    # which is safe only because it publishes web on the host's loopback, for the proxy there.
    assert image.services["web"]["ports"] == ["127.0.0.1:8000:8000"]
    api_key, secret = make_key(make_org())
    api_key.ip_allowlist = ["203.0.113.7"]
    api_key.save(update_fields=["ip_allowlist"])
    port = free_port()
    command = image.command.replace("--host 0.0.0.0 --port 8000", f"--host 127.0.0.1 --port {port}")
    web = _start(started, image, "web", ["sh", "-c", command])
    _wait_listening(web, port)

    def models(client_address: str) -> int:
        headers = {"Authorization": f"Bearer {secret}", "X-Forwarded-For": client_address}
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).status_code

    assert models("203.0.113.7") == 200
    assert models("198.51.100.1") == 403


@pytest.mark.django_db(transaction=True)
def test_the_worker_service_starts_and_answers_a_ping(image, started):
    worker = _start(started, image, "worker", _compose_command(image, "worker"))
    _wait_for_line(worker, r"celery@\S+ ready\.")

    ping = subprocess.run(
        [str(image.bin / "celery"), "-A", "portal", "inspect", "ping", "--timeout", "10"],
        cwd=image.app,
        env=_runtime_env(image, "worker"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "pong" in ping.stdout, ping.stdout + ping.stderr


@pytest.mark.django_db(transaction=True)
def test_the_beat_service_starts(image, started):
    beat = _start(started, image, "beat", _compose_command(image, "beat"))
    _wait_for_line(beat, r"beat: Starting")
