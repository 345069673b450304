"""compose.yaml, the Procfile and the Dockerfile cannot be run here (no Docker), so each
command in them is checked against the code: the ASGI application imports, the Celery app,
its worker and beat exist (and every task beat schedules is registered), each management
command and command-line option exists, every environment variable they set is read by the
code, and the health-check path answers. tests/ops/test_production_install.py runs them: the
image's install in a fresh virtualenv, and each process started."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from typing import Any

import click
import httpx
import pytest
import yaml
from celery.app.utils import find_app
from celery.bin.beat import beat as celery_beat
from celery.bin.worker import worker as celery_worker
from django.core.management import get_commands
from django.utils.module_loading import import_string

from tests.ops.process_files import COMPOSE, dockerfile_command, dockerfile_env
from tests.servers import REPO

# Our image's services: the ones built from the Dockerfile (the others run postgres/redis).
OURS = {name: s for name, s in COMPOSE["services"].items() if s.get("build") == "."}


def _dockerfile_cmd() -> list[str]:
    """The Dockerfile's CMD, from `exec` on (it is `sh -c "… && exec uvicorn …"`)."""
    return shlex.split(dockerfile_command().split("exec ", 1)[1])


def _procfile() -> dict[str, list[str]]:
    lines = (REPO / "Procfile").read_text().splitlines()
    return {
        kind.strip(): shlex.split(command)
        for kind, command in (line.split(":", 1) for line in lines if line.strip())
    }


def _options(command: click.Command) -> set[str]:
    names = (name for param in command.params for name in (*param.opts, *param.secondary_opts))
    return {name for name in names if name.startswith("-")}  # --no-x too


def _unknown_options(argv: list[str], command: click.Command) -> list[str]:
    given = [arg.split("=", 1)[0] for arg in argv if arg.startswith("-")]
    return [option for option in given if option not in _options(command)]


def problems_of(argv: list[str]) -> list[str]:
    """What is wrong with one process command (empty: every part of it exists)."""
    program, *args = argv
    if program == "uvicorn":
        uvicorn_cli = importlib.import_module("uvicorn.main").main
        module, _, attribute = args[0].partition(":")
        app = import_string(f"{module}.{attribute}")
        found = [] if callable(app) else [f"{args[0]} is not an application"]
        return found + _unknown_options(args[1:], uvicorn_cli)
    if program == "celery":
        assert args[0] == "-A", argv
        app = find_app(args[1])
        subcommands = {"worker": celery_worker, "beat": celery_beat}
        if args[2] not in subcommands:
            return [f"celery {args[2]}: not a process we run"]
        return ([] if app.main == "switchboard" else [f"{args[1]}: not our Celery app"]) + (
            _unknown_options(args[3:], subcommands[args[2]])
        )
    if program == "python" and args[0] == "manage.py":
        return [] if args[1] in get_commands() else [f"manage.py {args[1]}: no such command"]
    return [f"{program}: unknown program"]


@pytest.mark.parametrize(
    "name", sorted(name for name, service in OURS.items() if "command" in service)
)
def test_each_compose_command_names_what_exists(name):
    assert problems_of(OURS[name]["command"]) == []


def test_the_images_default_command_serves_the_asgi_application():
    argv = _dockerfile_cmd()
    assert argv[:2] == ["uvicorn", "portal.asgi:application"]
    assert problems_of(argv) == []


@pytest.mark.parametrize("kind", sorted(_procfile()))
def test_each_procfile_command_names_what_exists(kind):
    assert problems_of(_procfile()[kind]) == []


def test_the_process_files_run_a_web_server_a_worker_and_one_beat():
    assert {"web", "worker", "beat", "migrate"} <= set(OURS)
    assert OURS["beat"]["deploy"]["replicas"] == 1
    assert {"web", "worker", "beat", "release"} == set(_procfile())


def _variables_the_code_reads() -> set[str]:
    read = re.compile(r"""(?:env_\w+|environ\.get|getenv|environ\[)\(?\s*["']([A-Z][A-Z0-9_]+)""")
    names: set[str] = set()
    for package in ("portal", "billing", "gateway"):
        for path in (REPO / package).rglob("*.py"):
            names |= set(read.findall(path.read_text()))
    # Provider secrets: the catalog names the variable each provider's key is read from.
    catalog = yaml.safe_load((REPO / "catalog.example.yaml").read_text())
    names |= {p["api_key_env"] for p in catalog["providers"] if p.get("api_key_env")}
    return names


def test_every_variable_the_process_files_set_is_read_by_the_code():
    environment: dict[str, Any] = {}
    for service in OURS.values():
        environment |= service.get("environment", {})
    environment |= dockerfile_env()
    outside = {
        "PYTHONUNBUFFERED",  # Python's own
        "PYTHONDONTWRITEBYTECODE",
        "FORWARDED_ALLOW_IPS",  # uvicorn's own (--forwarded-allow-ips' default)
    }
    assert sorted(set(environment) - outside - _variables_the_code_reads()) == []


def test_the_settings_module_reads_variables_by_name():
    # The check above must see the settings' own variables, or it would pass on anything.
    assert {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "SWITCHBOARD_VAR_DIR"} <= (
        _variables_the_code_reads()
    )


def test_the_web_health_check_path_answers(gateway_server):
    check = " ".join(OURS["web"]["healthcheck"]["test"])
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w*)", check)
    assert url is not None, check
    port, path = url.groups()
    assert f"--port {port}" in " ".join(_dockerfile_cmd())  # it probes the port served
    assert httpx.get(f"{gateway_server.url}{path}").status_code == 200


def test_every_task_beat_schedules_is_registered():
    app = find_app("portal")
    app.loader.import_default_modules()
    scheduled = {entry["task"] for entry in app.conf.beat_schedule.values()}
    assert scheduled, "beat schedules nothing"
    assert sorted(scheduled - set(app.tasks)) == []


def test_every_process_shares_the_settlement_spool_folder():
    var_dir = next(
        line.split("SWITCHBOARD_VAR_DIR=", 1)[1].split()[0]
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if "SWITCHBOARD_VAR_DIR=" in line
    )
    # The folder the settings derive from the image's var dir.
    spool_dir = subprocess.run(
        [
            sys.executable,
            "-c",
            "from portal import settings; print(settings.BILLING_SETTLEMENT_SPOOL_DIR)",
        ],
        cwd=REPO,
        env={**os.environ, "SWITCHBOARD_VAR_DIR": var_dir},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    for name, service in OURS.items():
        mounts = {volume.split(":", 1)[1] for volume in service.get("volumes", [])}
        assert spool_dir in mounts, name
