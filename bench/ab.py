"""A/B of Switchboard trees: two (or more) checkouts served side by side, at the same time, on
one PostgreSQL, Redis and fake upstream, measured in alternating rounds. How each change of
issue 7 was measured (bench/RESULTS.md): on a shared machine, figures from different minutes
do not compare, figures from the same rounds do.

    git worktree add /tmp/before <commit>     # or: git archive <commit> | tar -x -C /tmp/before
    python -m bench.ab before=/tmp/before after=. [--rounds 3] [--streams]

Prints, per tree, the medians over rounds of: latency p50 at c=1 (ms), requests/s at c=64,
the server's CPU per request (ms), PostgreSQL's and Redis's CPU per request (ms), and with
`--streams`, time to first token at 50 streams (ms) and the server's CPU per stream (ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench.run import (
    UVICORN,
    Processes,
    Target,
    _service_pids,
    _wait_ready,
    cpu_seconds,
    latency,
    streams,
    switchboard_env,
    switchboard_key,
    throughput,
)
from tests.services import free_port, start_postgres, start_redis


def _serve(
    trees: list[tuple[str, Path]],
    workdir: Path,
    processes: Processes,
    stops: list[Callable[[], None]],
) -> list[Target]:
    """The fake upstream, PostgreSQL, Redis and one uvicorn per tree; the database is set up
    once, by the first tree's code (the trees must share their migrations)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE", "PYTHONPATH"}
    }
    upstream_port = free_port()
    upstream = processes.start(
        [sys.executable, "-m", "bench.upstream", "--port", str(upstream_port)],
        env=env,
        log=workdir / "upstream.log",
    )
    upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
    _wait_ready(upstream_url, upstream, timeout=20, headers={})
    database_url, stop = start_postgres(workdir)
    stops.append(stop)
    redis_url, stop = start_redis(workdir)
    stops.append(stop)
    services = _service_pids(workdir, redis_url)
    env = switchboard_env(env, workdir, database_url, redis_url)
    secret = switchboard_key(upstream_url, env=env, code=trees[0][1])
    auth = {"Authorization": f"Bearer {secret}"}
    targets = []
    for name, tree in trees:
        port = free_port()
        with (workdir / f"{name}.log").open("wb") as log:
            # Run from the tree: its code shadows the installed project.
            server = subprocess.Popen(
                [*UVICORN, "--port", str(port), "portal.asgi:application"],
                cwd=tree,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        processes.started.append(server)
        url = f"http://127.0.0.1:{port}/v1"
        _wait_ready(url, server, timeout=60, headers=auth)
        targets.append(Target(name, url, pids=[server.pid], service_pids=services, headers=auth))
    return targets


async def _measure(targets: list[Target], args: argparse.Namespace) -> None:
    figures: dict[str, dict[str, list[float]]] = {target.name: {} for target in targets}

    def note(target: Target, label: str, value: float) -> None:
        figures[target.name].setdefault(label, []).append(value)

    for target in targets:  # warm-up
        await latency(target, 30)
        await throughput(target, 16, 1.0)
    for round_ in range(args.rounds):
        order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
        for target in order:
            note(
                target, "p50 c=1 ms", statistics.median(await latency(target, args.requests)) * 1e3
            )
        for target in order:
            services_before = cpu_seconds(target.service_pids)
            rps, cpu = await throughput(target, 64, args.seconds)
            services = cpu_seconds(target.service_pids) - services_before
            note(target, "req/s c=64", rps)
            note(target, "server CPU/req ms", cpu * 1e3)
            note(target, "PG+Redis CPU/req ms", services / (rps * args.seconds) * 1e3)
        if args.streams:
            for target in order:
                firsts, cpu, _ = await streams(target, 50, 2)
                note(target, "TTFT 50 streams ms", statistics.median(firsts) * 1e3)
                note(target, "server CPU/stream ms", cpu * 1e3)
        print(f"round {round_ + 1}/{args.rounds}, load {os.getloadavg()[0]:.1f}", flush=True)
    for name, values in figures.items():
        print(name, "  ".join(f"{k} {statistics.median(v):.2f}" for k, v in values.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("trees", nargs="+", help="name=path of a Switchboard checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200, help="c=1 requests a round")
    parser.add_argument("--seconds", type=float, default=5.0, help="c=64 duration a round")
    parser.add_argument("--streams", action="store_true", help="also 50 concurrent streams")
    args = parser.parse_args()
    trees = [(name, Path(path).resolve()) for name, path in (t.split("=", 1) for t in args.trees)]
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-ab-"))
    processes = Processes()
    stops: list[Callable[[], None]] = []
    try:
        asyncio.run(_measure(_serve(trees, workdir, processes, stops), args))
    finally:
        processes.stop()
        for stop in reversed(stops):
            stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
