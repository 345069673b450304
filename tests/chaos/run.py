"""`make chaos`: sustained load through several gateway processes while one fault strikes.

    python -m tests.chaos.run [--fault kill-gateway|kill-worker|restart-redis|postgres-down|all]
                              [--seconds 20] [--clients 8] [--processes 3] [--pool-timeout 10]

Each run starts its own PostgreSQL, Redis, fake provider, gateway processes (uvicorn) and a
Celery worker on the Redis broker, drives a mix of whole and streamed completions through
the gateways round robin, injects one fault a third of the way in (and repairs it at two
thirds, when it can be repaired), then waits for every client, runs the sweeper over every
hold left (the clients are done, so any hold left belongs to a dead process) and `reconcile`.

It prints what was sent, answered, charged and lost, double charges, overspend, and how
requests sent while a dependency was down were answered: the goal is 0 lost usage, 0 double
charges, 0 overspend and clear 5xx answers within the timeout (no hangs). Not part of
`make test` (about a minute a fault); exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from tests.services import (
    _as_postgres_user,
    _postgres_bin_dir,
    free_port,
    is_listening,
    start_postgres,
    wait_for_port,
)

REPO = Path(__file__).resolve().parents[2]
FAULTS = ("kill-gateway", "kill-worker", "restart-redis", "postgres-down")
CLIENT_TIMEOUT_SECONDS = 30.0  # an answer slower than this counts as a hang
PROMPT = " ".join(f"word{i}" for i in range(30))  # 30-word answers: streams of 1.5 s


@dataclass
class Outcome:
    started: float
    seconds: float
    kind: str  # "answered", "cut" (a stream ended without [DONE]), "http <status>",
    # "refused" (no process listening), "hang", "error <type>"
    request_id: str = ""
    got_bytes: bool = False


@dataclass
class Run:
    fault: str
    outcomes: list[Outcome] = field(default_factory=list)
    fault_window: tuple[float, float] = (0.0, 0.0)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Redis:
    """redis-server on a fixed port, so that it can be restarted where the clients expect it."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def _aof(self) -> list[str]:
        return ["--appendonly", "yes", "--dir", str(self.workdir)]

    def start(self) -> None:
        server = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen(
            [server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *self._aof],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


def pg_ctl(workdir: Path, action: str) -> None:
    """stop (immediately, as a crash) or start the PostgreSQL that start_postgres made.

    Started here, it commits synchronously, as production does: the test suite's instance
    (synchronous_commit=off) loses the last commits in a crash, which would count as usage
    lost by Switchboard when it is the database's own setting that lost it."""
    port = json.loads((workdir / "pgport.json").read_text())
    argv = [str(_postgres_bin_dir() / "pg_ctl"), "-D", str(workdir / "pgdata"), "-w"]
    if action == "stop":
        argv += ["-m", "immediate", "stop"]
    else:
        options = (
            f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=on -c full_page_writes=off -c max_connections=300"
        )
        argv += ["-o", options, "-l", str(workdir / "postgres.log"), "start"]
    subprocess.run(_as_postgres_user(argv), check=True, stdout=subprocess.DEVNULL)


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(part) for part in parts) + "\n")
    sys.stdout.flush()


def one_request(url: str, key: str, *, stream: bool) -> Outcome:
    started = time.monotonic()
    body = {
        "model": "chaos-model",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}"}
    outcome = Outcome(started=started, seconds=0.0, kind="")
    try:
        with (
            httpx.Client(timeout=CLIENT_TIMEOUT_SECONDS) as client,
            client.stream("POST", f"{url}/chat/completions", json=body, headers=headers) as reply,
        ):
            outcome.request_id = reply.headers.get("x-request-id", "")
            if reply.status_code != 200:
                reply.read()
                outcome.kind = f"http {reply.status_code}"
            elif not stream:
                outcome.got_bytes = True
                reply.read()
                outcome.got_bytes = True
                outcome.kind = "answered" if "usage" in reply.json() else "cut"
            else:
                outcome.got_bytes = True  # the answer has begun: it must be charged
                done = False
                for line in reply.iter_lines():
                    outcome.got_bytes = True
                    done = done or line == "data: [DONE]"
                outcome.kind = "answered" if done else "cut"
    except httpx.ConnectError:
        outcome.kind = "refused"
    except httpx.TimeoutException:
        outcome.kind = "hang"
    except httpx.HTTPError as exc:
        outcome.kind = "cut" if outcome.got_bytes else f"error {type(exc).__name__}"
    outcome.seconds = time.monotonic() - started
    return outcome


def drive_load(run: Run, urls: list[str], key: str, *, clients: int, until: float) -> None:
    def client_loop(index: int) -> None:
        n = index
        while time.monotonic() < until:
            outcome = one_request(urls[n % len(urls)], key, stream=n % 2 == 0)
            with run.lock:
                run.outcomes.append(outcome)
            n += 1

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


_QUIET = ["--loglevel", "warning", "--without-mingle", "--without-gossip"]


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "portal", "worker", "--concurrency", "1", *_QUIET],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def run_fault(fault: str, args: argparse.Namespace, workdir: Path, redis: Redis) -> bool:
    from django.db import connections

    import portal.celery  # noqa: F401 (the app that `delay` sends with)
    from billing.models import Reservation, UsageRecord
    from billing.selectors import ledger_violations, wallet_balance_usd
    from billing.services import reservations_sweep
    from billing.settlement_spool import spooled_settlements_replay
    from billing.tasks import sweep_stale_reservations
    from tests.factories import make_key, make_org
    from tests.servers import GatewayProcesses

    org = make_org(credit_usd="1000")
    api_key, key = make_key(org)
    # Limits far above the load, so that every request goes through Redis (gateway/limits.py)
    # as a limited key's does in production: a Redis fault is then on the request path.
    api_key.requests_per_minute = 100_000
    api_key.max_concurrent_requests = 1_000
    api_key.save(update_fields=["requests_per_minute", "max_concurrent_requests"])
    credit = wallet_balance_usd(organization_id=org.pk)
    # The gateways pool their connections, as in production (this process does not).
    env = {
        "DATABASE_POOL": "true",
        "DATABASE_POOL_TIMEOUT_SECONDS": str(args.pool_timeout),
        "BILLING_SPOOL_REPLAY_SECONDS": "2",
    }
    gateways = GatewayProcesses(args.processes, env=env).start()
    worker = start_worker(dict(os.environ))
    run = Run(fault=fault)
    began = time.monotonic()
    strike, repair = began + args.seconds / 3, began + 2 * args.seconds / 3
    load = threading.Thread(
        target=drive_load,
        args=(run, gateways.urls, key),
        kwargs={"clients": args.clients, "until": began + args.seconds},
    )
    load.start()
    peak_spool = [0]

    def watch_spool() -> None:  # the most settlements waiting in the spool at any moment
        while load.is_alive():
            peak_spool[0] = max(peak_spool[0], _spool_depth(workdir, redis))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch_spool, daemon=True)
    watcher.start()
    try:
        time.sleep(strike - time.monotonic())
        if fault == "kill-gateway":
            gateways.kill(0)
        elif fault == "kill-worker":
            for _ in range(20):  # work in the queue while it dies
                sweep_stale_reservations.delay()
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
        elif fault == "restart-redis":
            redis.stop()
        elif fault == "postgres-down":
            pg_ctl(workdir, "stop")
        time.sleep(max(0.0, repair - time.monotonic()))
        if fault == "kill-worker":
            worker = start_worker(dict(os.environ))
        elif fault == "restart-redis":
            redis.start()
        elif fault == "postgres-down":
            pg_ctl(workdir, "start")
        run.fault_window = (strike, repair)
        load.join()
        # Settlements spooled while the database was down: the gateways replay them by
        # themselves once it is back (every BILLING_SPOOL_REPLAY_SECONDS).
        drained = _wait_for_empty_spool(workdir, redis, timeout=60.0)
    finally:
        gateways.stop()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)

    connections.close_all()  # this process's connection may predate a database restart
    # Whatever a gateway could not replay (none, when `drained`) is replayed before the sweep,
    # as beat does: the sweeper would otherwise void holds whose usage is in the spool.
    replayed_here = spooled_settlements_replay().settled
    # Every client has its answer: a hold still open belongs to a dead process.
    swept = reservations_sweep(older_than=timedelta(0))
    violations = ledger_violations(held_longer_than=timedelta(0))
    ids = {o.request_id for o in run.outcomes if o.request_id}
    records = {r.request_id: r for r in UsageRecord.objects.filter(request_id__in=ids)}
    delivered = [o for o in run.outcomes if o.got_bytes]
    answered = [o for o in run.outcomes if o.kind == "answered"]
    unrecorded = {o.request_id for o in delivered if o.request_id not in records}
    # The design's bound: a stream cut by a crash before its first checkpoint (its first
    # second) is voided by the sweeper, uncharged. Anything else unrecorded is lost usage.
    voided = set(
        Reservation.objects.filter(
            request_id__in=unrecorded,
            state=Reservation.State.VOIDED,
            checkpoint_cost_usd__isnull=True,
            resolved_at__isnull=False,
        ).values_list("request_id", flat=True)
    )
    uncheckpointed = [o for o in delivered if o.request_id in voided and o.kind == "cut"]
    lost = [o for o in delivered if o.request_id in unrecorded and o not in uncheckpointed]
    uncharged = [o for o in answered if records.get(o.request_id) is None]
    charged = sum(1 for r in records.values() if r.cost_usd > 0)
    # UsageRecord.request_id is unique, so a second charge would be a second ledger posting
    # for the same request, which reconcile reports; count both ways.
    double = sum(1 for o in ids if UsageRecord.objects.filter(request_id=o).count() > 1)
    balance = wallet_balance_usd(organization_id=org.pk)
    spent = sum((r.cost_usd for r in records.values()), Decimal(0))
    overspend = max(Decimal(0), -balance)
    held_left = Reservation.objects.filter(state=Reservation.State.HELD).count()
    # Requests in flight at any moment of the fault.
    in_window = [o for o in run.outcomes if o.started <= repair and o.started + o.seconds >= strike]
    kinds = Counter(o.kind for o in run.outcomes)
    window_kinds = Counter(o.kind for o in in_window)
    hangs = sum(1 for o in run.outcomes if o.kind == "hang")
    slowest_error = max(
        (o.seconds for o in in_window if o.kind.startswith(("http 5", "error"))), default=0.0
    )
    slowest_in_window = max((o.seconds for o in in_window), default=0.0)

    say(
        f"\n== fault: {fault} ({args.processes} gateways, {args.clients} clients, "
        f"{args.seconds:.0f} s) =="
    )
    say(
        f"sent {len(run.outcomes)}  answered {len(answered)}  charged {charged}  "
        f"lost {len(lost)}  double charges {double}  overspend {overspend}"
    )
    say(f"outcomes: {dict(kinds)}")
    say(
        f"in flight during the fault: {dict(window_kinds)}; slowest {slowest_in_window:.2f} s, "
        f"slowest error answer "
        f"{slowest_error:.2f} s; hangs (> {CLIENT_TIMEOUT_SECONDS:.0f} s) {hangs}"
    )
    say(
        f"swept after the run {swept}; holds left {held_left}; wallet {credit} -> {balance} "
        f"(usage records total {spent}); reconcile: "
        + ("clean" if not violations else "; ".join(violations))
    )
    say(
        f"settlement spool: at most {peak_spool[0]} waiting during the run; "
        + ("emptied by the gateways" if drained else "NOT emptied by the gateways")
        + f"; replayed after the run {replayed_here}"
    )
    if uncheckpointed:
        say(
            f"cut by the crash before their first checkpoint (uncharged, ≤ 1 s each): "
            f"{len(uncheckpointed)}"
        )
    if uncharged:
        say(f"answered but uncharged: {len(uncharged)}")
    ok = not lost and not double and not overspend and not violations and not hangs
    say("result:", "OK" if ok else "GOALS MISSED")
    return ok


def _spool_depth(workdir: Path, redis: Redis) -> int:
    """Entries in the settlement spool: the Redis list and the spool files."""
    import redis as redis_py

    from billing.settlement_spool import SPOOL_KEY

    client = redis_py.Redis.from_url(
        f"{redis.url}/0", socket_connect_timeout=0.5, socket_timeout=0.5, retry=None
    )
    try:
        waiting = int(client.llen(SPOOL_KEY))
    except redis_py.RedisError:
        waiting = 0
    finally:
        client.close()
    folder = workdir / "var" / "settlement-spool"
    for path in folder.glob("*.jsonl") if folder.is_dir() else ():
        if path.name != "dead.jsonl":
            waiting += sum(1 for line in path.read_text().splitlines() if line.strip())
    return waiting


def _wait_for_empty_spool(workdir: Path, redis: Redis, *, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _spool_depth(workdir, redis):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fault", choices=(*FAULTS, "all"), default="all")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--processes", type=int, default=3)
    # Shorter than the database outage, it makes settlements fail (and be spooled) during it;
    # longer, they wait for the database to come back.
    parser.add_argument(
        "--pool-timeout", type=int, default=10, help="the gateways' DATABASE_POOL_TIMEOUT_SECONDS"
    )
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="switchboard-chaos-"))
    database_url, stop_postgres = start_postgres(workdir)
    (workdir / "pgport.json").write_text(database_url.rsplit(":", 1)[1].split("/")[0])
    pg_ctl(workdir, "stop")  # started again with synchronous commits (see pg_ctl)
    pg_ctl(workdir, "start")
    redis = Redis(workdir)
    redis.start()
    try:
        os.environ.update(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": f"{redis.url}/0",
                "CELERY_BROKER_URL": f"{redis.url}/1",
                "DJANGO_SETTINGS_MODULE": "portal.settings",
                "SWITCHBOARD_VAR_DIR": str(workdir / "var"),
                "LOG_LEVEL": "ERROR",
                "DATABASE_POOL": "false",
            }
        )
        import django

        django.setup()
        from django.core.management import call_command

        from gateway.services import catalog_load
        from tests.conftest import FAKE_PROVIDER_KEY_ENV, FAKE_PROVIDER_SECRET
        from tests.fakes.provider import FakeProvider

        call_command("migrate", verbosity=0)
        os.environ[FAKE_PROVIDER_KEY_ENV] = FAKE_PROVIDER_SECRET
        provider = FakeProvider(chunk_interval=0.05).start()
        catalog: dict[str, Any] = {
            "providers": [
                {
                    "name": "fake",
                    "kind": "openai",
                    "base_url": provider.base_url,
                    "api_key_env": FAKE_PROVIDER_KEY_ENV,
                }
            ],
            "models": [
                {
                    "name": "chaos-model",
                    "routes": [{"provider": "fake", "upstream_model": "fake-small"}],
                    "price": {"input": "0.50", "output": "1.50"},
                    "max_output_tokens": 200,
                }
            ],
        }
        catalog_load(data=catalog)
        faults = FAULTS if args.fault == "all" else (args.fault,)
        results = [run_fault(fault, args, workdir, redis) for fault in faults]
        provider.stop()
        return 0 if all(results) else 1
    finally:
        redis.stop()
        if is_listening(int((workdir / "pgport.json").read_text())):
            stop_postgres()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
