"""localstripe (a stateful fake Stripe server with a fake Stripe.js) as a real subprocess."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import httpx

from tests.fakes.base import FakeUpstream, Receive, Scope, Send, read_body, send_json

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


@dataclass(frozen=True)
class IdempotentCall:
    """A POST the proxy forwarded: its path, Idempotency-Key and parameters (decoded form)."""

    path: str
    idempotency_key: str
    params: tuple[tuple[str, str], ...]


class IdempotentStripe(FakeUpstream):
    """A proxy in front of localstripe that keeps Stripe's promise about idempotency keys,
    which localstripe ignores: a POST whose key was used before is not made again; it gets the
    first answer when its parameters are the same, and Stripe's idempotency error when they
    differ. Every POST with a key is recorded in `calls`, whether it was made or answered
    from the key.

    `lose_next_answers(n)`: the next n new POSTs are made (Stripe keeps their answer under the
    key) but the client gets a 500 that must not be retried, as when Stripe's answer is lost.
    """

    api_root = ""  # Stripe's paths carry their own /v1

    def __init__(self, upstream: LocalStripe) -> None:
        self._upstream = upstream
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[tuple[tuple[str, str], ...], int, bytes]] = {}
        self._losing = 0
        self.calls: list[IdempotentCall] = []

    def reset(self) -> None:
        with self._lock:
            self._answers.clear()
            self._losing = 0
            self.calls.clear()

    def lose_next_answers(self, count: int = 1) -> None:
        with self._lock:
            self._losing = count

    def payment_intent_creations(self) -> list[IdempotentCall]:
        return [call for call in self.calls if call.path == "/v1/payment_intents"]

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await read_body(receive)
        if raw is None:
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = headers.get("idempotency-key", "") if scope["method"] == "POST" else ""
        params = tuple(sorted(parse_qsl(raw.decode(), keep_blank_values=True)))
        with self._lock:
            known = self._answers.get(key) if key else None
            if key:
                self.calls.append(IdempotentCall(scope["path"], key, params))
        if known is not None:
            first_params, status, body = known
            if first_params != params:
                await send_json(send, 400, _IDEMPOTENCY_ERROR)
            else:
                await send_json(send, status, body)
            return
        query = scope.get("query_string", b"").decode()
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.request(
                scope["method"],
                f"{self._upstream.url}{scope['path']}" + (f"?{query}" if query else ""),
                content=raw,
                headers={
                    name: value
                    for name, value in headers.items()
                    if name in {"authorization", "content-type", "stripe-version"}
                },
            )
        lost = False
        with self._lock:
            if key:
                self._answers[key] = (params, answer.status_code, answer.content)
                lost, self._losing = self._losing > 0, max(self._losing - 1, 0)
        if lost:
            await send_json(send, 500, _LOST_ANSWER, {"stripe-should-retry": "false"})
        else:
            await send_json(send, answer.status_code, answer.content)


_IDEMPOTENCY_ERROR = {
    "error": {
        "type": "idempotency_error",
        "message": "Keys for idempotent requests can only be used with the same parameters "
        "they were first used with.",
    }
}
_LOST_ANSWER = {"error": {"type": "api_error", "message": "the answer was lost on its way"}}
