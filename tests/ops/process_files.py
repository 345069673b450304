"""The process files read as data: compose.yaml, and the Dockerfile's instructions. Shared by
the tests that check their commands against the code (test_process_files.py) and the ones that
run them (test_production_install.py)."""

from __future__ import annotations

import json
import shlex
from typing import Any

import yaml

from tests.servers import REPO

COMPOSE: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """Each instruction of the Dockerfile and its arguments, continuation lines joined."""
    lines = (REPO / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    instructions = [line.split(None, 1) for line in lines if line.strip()]
    return [(words[0], words[1]) for words in instructions if not words[0].startswith("#")]


def dockerfile_env() -> dict[str, str]:
    """The variables the Dockerfile's ENV instructions set, as written."""
    return dict(
        assignment.split("=", 1)
        for instruction, arguments in dockerfile_instructions()
        if instruction == "ENV"
        for assignment in shlex.split(arguments)
    )


def dockerfile_command() -> str:
    """The shell command line the image runs by default (its CMD is `["sh", "-c", "<line>"]`)."""
    [arguments] = [args for instruction, args in dockerfile_instructions() if instruction == "CMD"]
    command = json.loads(arguments)
    assert command[:2] == ["sh", "-c"], command
    return str(command[2])
