"""Serve an ASGI application on a real socket from a background thread, for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from tests.services import free_port, is_listening

REPO = Path(__file__).resolve().parents[1]


class ThreadedServer:
    """uvicorn serving `app` on 127.0.0.1 at a free port, in a daemon thread with its own loop."""

    def __init__(self, app: Any) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. Without it every response whose headers and body
        # are written separately waits ~40 ms on Nagle and the client's delayed ACK.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            interface="asgi3",
            http="h11",
            lifespan="off",
            # Leave the process's logging to pytest and Django; uvicorn would dictConfig it.
            log_config=None,
            access_log=False,
            # A test that stops a server mid-stream should not wait for the stream.
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 10.0) -> ThreadedServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()


def child_database_url() -> str:
    """DATABASE_URL for the test database pytest-django created (for child processes)."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    password = f":{database['PASSWORD']}" if database.get("PASSWORD") else ""
    return (
        f"postgres://{database['USER']}{password}@{database['HOST']}:{database['PORT']}"
        f"/{database['NAME']}"
    )


class GatewayProcesses:
    """N separate Switchboard gateway processes (uvicorn), sharing the test database and Redis,
    as production runs them behind a load balancer."""

    def __init__(self, count: int, *, env: dict[str, str] | None = None) -> None:
        self.ports = [free_port() for _ in range(count)]
        self._env = {**os.environ, "DATABASE_URL": child_database_url(), **(env or {})}
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/v1" for port in self.ports]

    def start(self, *, timeout: float = 30.0) -> GatewayProcesses:
        for port in self.ports:
            self.processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "uvicorn",
                        "portal.asgi:application",
                        "--port",
                        str(port),
                        "--log-level",
                        "warning",
                        "--no-access-log",
                        "--lifespan",
                        "off",
                    ],
                    cwd=REPO,
                    env=self._env,
                )
            )
        deadline = time.monotonic() + timeout
        for port, process in zip(self.ports, self.processes, strict=True):
            while not is_listening(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"gateway process on port {port} did not start")
                time.sleep(0.05)
        return self

    def kill(self, index: int) -> None:
        """kill -9 one process, as a crash would."""
        self.processes[index].send_signal(signal.SIGKILL)
        self.processes[index].wait(timeout=10)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
