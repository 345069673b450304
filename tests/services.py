"""A pytest plugin (loaded with `-p tests.services`) that gives the suite real PostgreSQL and
Redis servers.

When DATABASE_URL / REDIS_URL are not set, it starts throwaway instances on loopback, on free
ports, with data directories in a temporary folder, and removes them when the run ends. It
runs before pytest-django reads the settings, which is why it is a plugin and not a fixture.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def is_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(port: int, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_listening(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")
        time.sleep(0.05)


def _postgres_bin_dir() -> Path:
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name), reverse=True
    )
    for candidate in candidates:
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise pytest.UsageError(
        "PostgreSQL is not installed (apt-get install postgresql) and DATABASE_URL is not set"
    )


def _as_postgres_user(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root; CI and these machines run as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


def start_postgres(workdir: Path) -> tuple[str, Callable[[], None]]:
    bindir = _postgres_bin_dir()
    datadir = workdir / "pgdata"
    datadir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        shutil.chown(datadir, "postgres")
    subprocess.run(
        _as_postgres_user(
            [
                str(bindir / "initdb"),
                "-D",
                str(datadir),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    port = free_port()
    options = (
        f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
    )
    subprocess.run(
        _as_postgres_user(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(datadir),
                "-o",
                options,
                "-l",
                str(workdir / "postgres.log"),
                "-w",
                "start",
            ]
        ),
        check=True,
        stdout=subprocess.DEVNULL,
    )

    def stop() -> None:
        subprocess.run(
            _as_postgres_user(
                [str(bindir / "pg_ctl"), "-D", str(datadir), "-m", "immediate", "stop"]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )

    return f"postgres://postgres@127.0.0.1:{port}/postgres", stop


def start_redis(workdir: Path) -> tuple[str, Callable[[], None]]:
    server = shutil.which("redis-server")
    if server is None:
        raise pytest.UsageError(
            "redis-server is not installed (apt-get install redis-server) and REDIS_URL is not set"
        )
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port)

    def stop() -> None:
        process.terminate()
        process.wait(timeout=10)

    return f"redis://127.0.0.1:{port}/0", stop


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    need_postgres = not os.environ.get("DATABASE_URL")
    need_redis = not os.environ.get("REDIS_URL")
    if not (need_postgres or need_redis):
        return
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-test-"))
    stops: list[Callable[[], None]] = []

    def cleanup() -> None:
        for stop in reversed(stops):
            stop()
        shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(cleanup)
    if need_postgres:
        url, stop = start_postgres(workdir)
        stops.append(stop)
        os.environ["DATABASE_URL"] = url
    if need_redis:
        url, stop = start_redis(workdir)
        stops.append(stop)
        os.environ["REDIS_URL"] = url
