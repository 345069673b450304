"""localstripe (a stateful fake Stripe server with a fake Stripe.js) as a real subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SECRET_KEY = "sk_test_switchboard"
PUBLISHABLE_KEY = "pk_test_switchboard"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalStripe:
    def __init__(self) -> None:
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def js_url(self) -> str:
        return f"{self.url}/js.stripe.com/v3/"

    def start(self, *, log_path: Path) -> LocalStripe:
        executable = Path(sys.executable).with_name("localstripe")
        self._log = log_path.open("wb")
        self._process = subprocess.Popen(
            [str(executable), "--port", str(self.port), "--from-scratch"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.url}/v1/customers", auth=(SECRET_KEY, ""), timeout=2)
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"localstripe did not start; see {log_path}") from None
                time.sleep(0.05)

    def reset(self, *, webhook_url: str, webhook_secret: str) -> None:
        """Forget every object and send signed webhooks to `webhook_url` only."""
        httpx.delete(f"{self.url}/_config/data", timeout=10).raise_for_status()
        httpx.post(
            f"{self.url}/_config/webhooks/switchboard",
            data={"url": webhook_url, "secret": webhook_secret},
            timeout=10,
        ).raise_for_status()

    def silence_webhooks(self) -> None:
        """Send no more webhooks (until the next reset): Stripe's answer is late, and the
        test delivers the events itself when it chooses."""
        httpx.post(
            f"{self.url}/_config/webhooks/switchboard",
            data={"url": "http://127.0.0.1:9/", "secret": "unused"},  # the discard port
            timeout=10,
        ).raise_for_status()

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._log.close()
