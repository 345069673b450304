"""`make bench`: Switchboard side by side with a direct call, a bare proxy and LiteLLM.

Starts, on this machine: throwaway PostgreSQL and Redis (tests/services.py), the fake upstream
(bench/upstream.py), the bare ASGI proxy (bench/bareproxy.py), Switchboard with full metering
(reservation, settlement, a spend cap and every rate limit on the key) and LiteLLM's proxy
(pinned, in its own venv under var/bench/, one worker, no callbacks, no database). Warms each
up, then runs interleaved rounds and prints one table of medians.

    python -m bench.run [--quick] [--rounds N] [--no-litellm] [--switchboard-only]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from tests.services import free_port, start_postgres, start_redis

REPO = Path(__file__).resolve().parents[1]
VAR = REPO / "var" / "bench"
LITELLM_VERSION = "1.108.0"
LITELLM_VENV = VAR / "litellm-venv"
LITELLM_KEY = "sk-bench-only-master-key-0123456789abcdef"
MODEL = "fake-small"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64}
STREAM_BODY = {**BODY, "stream": True}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A server on loopback, one worker; the port and the application follow.
UVICORN = [
    *(sys.executable, "-m", "uvicorn", "--no-access-log", "--lifespan", "off"),
    *("--log-level", "warning", "--host", "127.0.0.1"),
]
ERRORS: dict[str, int] = {}  # failed requests per target, printed under the table


# --------------------------------------------------------------------------- processes


def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (a server's workers, PostgreSQL's backends)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their descendants, from /proc/<pid>/stat."""
    total = 0
    for root in pids:
        for pid in _descendants(root):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def rss_mb(pids: list[int]) -> float:
    total_kb = 0
    for root in pids:
        for pid in _descendants(root):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
    return total_kb / 1024


@dataclass
class Target:
    name: str
    base_url: str  # ends with /v1
    pids: list[int] = field(default_factory=list)  # the server's processes, for CPU and RSS
    service_pids: list[int] = field(default_factory=list)  # its PostgreSQL and Redis
    headers: dict[str, str] = field(default_factory=dict)


class Processes:
    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
        for process in self.started:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_ready(
    url: str, process: subprocess.Popen[bytes], *, timeout: float, headers: dict[str, str]
) -> None:
    """Poll until the server answers a chat completion (LiteLLM takes seconds to start)."""
    import json
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the server exited (see var/bench/*.log)")
        try:
            request = urllib.request.Request(  # noqa: S310 (loopback URL of our own)
                f"{url}/chat/completions",
                data=json.dumps(BODY).encode(),
                headers={"Content-Type": "application/json", **headers},
            )
            with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout}s (see var/bench/*.log)")
        time.sleep(0.2)


def _litellm_python() -> Path:
    """LiteLLM's proxy in a venv of its own (its dependency pins clash with ours)."""
    python = LITELLM_VENV / "bin" / "python"
    marker = LITELLM_VENV / ".installed"
    if not marker.exists() or marker.read_text() != LITELLM_VERSION:
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} (once)")
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", f"litellm[proxy]=={LITELLM_VERSION}"],
            check=True,
        )
        marker.write_text(LITELLM_VERSION)
    return python


@contextmanager
def running_targets(args: argparse.Namespace) -> Iterator[list[Target]]:
    VAR.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="switchboard-bench-"))
    stops: list[Callable[[], None]] = []
    processes = Processes()
    base_env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
    }
    try:
        upstream_port = free_port()
        upstream = processes.start(
            [
                sys.executable,
                "-m",
                "bench.upstream",
                "--port",
                str(upstream_port),
                "--latency-ms",
                str(args.latency_ms),
                "--chunks",
                str(args.chunks),
                "--interval-ms",
                str(args.interval_ms),
            ],
            env=base_env,
            log=VAR / "upstream.log",
        )
        upstream_url = f"http://127.0.0.1:{upstream_port}/v1"
        _wait_ready(upstream_url, upstream, timeout=20, headers={})
        targets = [Target("direct", upstream_url, pids=[upstream.pid])]

        if not args.switchboard_only:
            bare_port = free_port()
            bare = processes.start(
                [*UVICORN, "--port", str(bare_port), "bench.bareproxy:app"],
                env={**base_env, "BENCH_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}"},
                log=VAR / "bareproxy.log",
            )
            bare_url = f"http://127.0.0.1:{bare_port}/v1"
            _wait_ready(bare_url, bare, timeout=30, headers={})
            targets.append(Target("bare proxy", bare_url, pids=[bare.pid]))

        database_url, stop = start_postgres(workdir)
        stops.append(stop)
        redis_url, stop = start_redis(workdir)
        stops.append(stop)
        service_pids = _service_pids(workdir, redis_url)
        sb_env = switchboard_env(base_env, workdir, database_url, redis_url)
        secret = switchboard_key(upstream_url, env=sb_env, code=REPO)
        sb_port = free_port()
        sb_command = [*UVICORN, "--port", str(sb_port), "portal.asgi:application"]
        if args.profile:
            sb_command = [
                sys.executable,
                "-m",
                "pyinstrument",
                "--async-mode=disabled",
                "-r",
                "html",
                "-o",
                str(VAR / "switchboard-profile.html"),
                "-m",
                "uvicorn",
                *sb_command[3:],
            ]
        switchboard = processes.start(sb_command, env=sb_env, log=VAR / "switchboard.log")
        sb_url = f"http://127.0.0.1:{sb_port}/v1"
        auth = {"Authorization": f"Bearer {secret}"}
        _wait_ready(sb_url, switchboard, timeout=60, headers=auth)
        targets.append(
            Target(
                "Switchboard",
                sb_url,
                pids=[switchboard.pid],
                service_pids=service_pids,
                headers=auth,
            )
        )

        if not (args.no_litellm or args.switchboard_only):
            python = _litellm_python()
            config = VAR / "litellm.yaml"
            config.write_text(
                "model_list:\n"
                f"  - model_name: {MODEL}\n"
                "    litellm_params:\n"
                f"      model: openai/{MODEL}\n"
                f"      api_base: {upstream_url}\n"
                "      api_key: bench\n"
                "litellm_settings:\n"
                "  telemetry: false\n"
            )
            litellm_port = free_port()
            litellm = processes.start(
                [
                    str(python.parent / "litellm"),
                    "--config",
                    str(config),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(litellm_port),
                    "--num_workers",
                    "1",
                    "--telemetry",
                    "False",
                ],
                env={
                    **base_env,
                    # Authentication on, as Switchboard's is: the master key, no database.
                    "LITELLM_MASTER_KEY": LITELLM_KEY,
                    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                    "LITELLM_LOG": "ERROR",
                    "NO_DOCS": "True",
                },
                log=VAR / "litellm.log",
            )
            litellm_url = f"http://127.0.0.1:{litellm_port}/v1"
            litellm_auth = {"Authorization": f"Bearer {LITELLM_KEY}"}
            _wait_ready(litellm_url, litellm, timeout=180, headers=litellm_auth)
            targets.append(Target("LiteLLM", litellm_url, pids=[litellm.pid], headers=litellm_auth))
        yield targets
    finally:
        processes.stop()
        for stop in reversed(stops):
            stop()
        shutil.rmtree(workdir, ignore_errors=True)


def switchboard_env(
    base_env: dict[str, str], workdir: Path, database_url: str, redis_url: str
) -> dict[str, str]:
    """Switchboard's environment on the benchmark's throwaway services."""
    return {
        **base_env,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "DEBUG": "false",
        "SECRET_KEY": "bench-only-secret-key-not-for-production-use-0123456789",
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "SWITCHBOARD_VAR_DIR": str(workdir / "var"),
    }


def switchboard_key(upstream_url: str, *, env: dict[str, str], code: Path) -> str:
    """Migrate, route the catalog to `upstream_url`, and return a metered key's secret
    (bench/switchboard_setup.py, run with the code in `code`)."""
    return subprocess.run(
        [sys.executable, "-m", "bench.switchboard_setup", upstream_url],
        cwd=code,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def _service_pids(workdir: Path, redis_url: str) -> list[int]:
    pids = [int((workdir / "pgdata" / "postmaster.pid").read_text().split()[0])]
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"redis-server" in command and port.encode() in command:
                pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------- load


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _one(session: aiohttp.ClientSession, target: Target) -> float:
    started = time.perf_counter()
    async with session.post(
        f"{target.base_url}/chat/completions", json=BODY, headers=target.headers
    ) as reply:
        await reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{target.name} answered {reply.status}")
    return time.perf_counter() - started


async def _stream(session: aiohttp.ClientSession, target: Target) -> tuple[float, int]:
    """Time to the first event, and the events received."""
    started = time.perf_counter()
    first = 0.0
    events = 0
    async with session.post(
        f"{target.base_url}/chat/completions", json=STREAM_BODY, headers=target.headers
    ) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{target.name} answered {reply.status} to a stream")
        async for line in reply.content:
            if line.startswith(b"data:"):
                if not events:
                    first = time.perf_counter() - started
                events += 1
    return first, events


def _session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=120)
    )


async def latency(target: Target, count: int) -> list[float]:
    async with _session(1) as session:
        return [await _one(session, target) for _ in range(count)]


async def throughput(target: Target, concurrency: int, seconds: float) -> tuple[float, float]:
    """Requests per second at `concurrency`, and the server's CPU seconds per request."""
    async with _session(concurrency) as session:
        await asyncio.gather(*(_one(session, target) for _ in range(concurrency)))  # connect
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                try:
                    await _one(session, target)
                except aiohttp.ClientError as exc:
                    ERRORS[target.name] = ERRORS.get(target.name, 0) + 1
                    print(f"{target.name}: {type(exc).__name__}: {exc}")
                    continue
                done += 1

        cpu_before = cpu_seconds(target.pids)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(target.pids) - cpu_before
    return done / elapsed, cpu / max(done, 1)


async def streams(target: Target, concurrency: int, repeat: int) -> tuple[list[float], float, int]:
    """Times to first event of `concurrency` simultaneous streams (`repeat` times), the server's
    CPU seconds per stream, and the events in one stream."""
    firsts: list[float] = []
    events = 0
    async with _session(concurrency) as session:
        cpu_before = cpu_seconds(target.pids)
        for _ in range(repeat):
            results = await asyncio.gather(*(_stream(session, target) for _ in range(concurrency)))
            firsts += [first for first, _ in results]
            events = results[0][1]
        cpu = cpu_seconds(target.pids) - cpu_before
    return firsts, cpu / (concurrency * repeat), events


# --------------------------------------------------------------------------- the table


@dataclass
class Figures:
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    cpu_per_request: list[float] = field(default_factory=list)
    cpu_with_services: list[float] = field(default_factory=list)
    ttft1: list[float] = field(default_factory=list)
    ttft50: list[float] = field(default_factory=list)
    cpu_per_stream: list[float] = field(default_factory=list)
    events: int = 0
    rss: float = 0.0


async def measure(targets: list[Target], args: argparse.Namespace) -> dict[str, Figures]:
    figures = {target.name: Figures() for target in targets}
    print("warming up")
    for target in targets:
        await latency(target, 30)
        await throughput(target, 16, 0.5)
        await streams(target, 5, 1)
    for round_ in range(args.rounds):
        order = targets[round_ % len(targets) :] + targets[: round_ % len(targets)]
        print(f"round {round_ + 1}/{args.rounds}: {', '.join(t.name for t in order)}")
        for target in order:
            times = await latency(target, args.requests)
            figures[target.name].p50.append(statistics.median(times))
            figures[target.name].p99.append(_percentile(times, 0.99))
        for target in order:
            services_before = cpu_seconds(target.service_pids)
            rps, cpu = await throughput(target, 64, args.seconds)
            services = cpu_seconds(target.service_pids) - services_before
            figures[target.name].rps.append(rps)
            figures[target.name].cpu_per_request.append(cpu)
            figures[target.name].cpu_with_services.append(cpu + services / (rps * args.seconds))
        for target in order:
            firsts, _, _ = await streams(target, 1, args.stream_repeat * 5)
            figures[target.name].ttft1.append(statistics.median(firsts))
            firsts, cpu, events = await streams(target, 50, args.stream_repeat)
            figures[target.name].ttft50.append(statistics.median(firsts))
            figures[target.name].cpu_per_stream.append(cpu)
            figures[target.name].events = events
    for target in targets:
        figures[target.name].rss = rss_mb(target.pids)
    return figures


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(figures: dict[str, Figures], args: argparse.Namespace) -> str:
    names = list(figures)
    direct = figures["direct"]

    def added(name: str, attr: str) -> float:
        return _med(getattr(figures[name], attr)) - _med(getattr(direct, attr))

    def per_frame_us(name: str) -> float:
        # CPU a stream costs beyond a whole answer, spread over its events.
        f = figures[name]
        extra = _med(f.cpu_per_stream) - _med(f.cpu_per_request)
        return max(extra, 0.0) / max(f.events, 1) * 1e6

    rows: list[tuple[str, Callable[[str], float], str, str]] = [
        ("latency p50, c=1 (ms)", lambda n: _med(figures[n].p50) * 1e3, "{:.2f}", ""),
        ("added p50, c=1 (ms)", lambda n: added(n, "p50") * 1e3, "{:.2f}", "<= 1.5"),
        ("added p99, c=1 (ms)", lambda n: added(n, "p99") * 1e3, "{:.2f}", ""),
        ("requests/s, c=64", lambda n: _med(figures[n].rps), "{:.0f}", ">= 20x LiteLLM"),
        (
            "CPU per request (ms), server",
            lambda n: _med(figures[n].cpu_per_request) * 1e3,
            "{:.2f}",
            "<= 3x bare proxy",
        ),
        (
            "CPU per request (ms), + PostgreSQL/Redis",
            lambda n: _med(figures[n].cpu_with_services) * 1e3,
            "{:.2f}",
            "",
        ),
        ("memory RSS after the run (MB)", lambda n: figures[n].rss, "{:.0f}", ""),
        ("added TTFT, 1 stream (ms)", lambda n: added(n, "ttft1") * 1e3, "{:.2f}", ""),
        ("added TTFT, 50 streams (ms)", lambda n: added(n, "ttft50") * 1e3, "{:.2f}", "<= 3"),
        ("CPU per stream frame (µs)", per_frame_us, "{:.0f}", "<= 150"),
    ]
    others = [n for n in names if n != "Switchboard"]
    header = ["", *names, *(f"SB / {n}" for n in others if n != "direct"), "SB / direct", "target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, value, fmt, target in rows:
        cells = [label]
        for name in names:
            if name == "direct" and label.startswith(("added", "CPU per stream")):
                cells.append("—")
            else:
                cells.append(fmt.format(value(name)))
        sb = value("Switchboard")
        for name in [*(n for n in others if n != "direct"), "direct"]:
            if name == "direct" and label.startswith(("added", "CPU per stream")):
                cells.append("—")
                continue
            other = value(name)
            cells.append(f"{sb / other:.2f}x" if other > 0 else "—")
        cells.append(target)
        lines.append("| " + " | ".join(cells) + " |")
    settings = (
        f"{args.rounds} interleaved rounds, medians; c=1: {args.requests} requests a round; "
        f"c=64: {args.seconds:g} s a round; streams: {args.chunks} chunks "
        f"{args.interval_ms:g} ms apart + usage + [DONE] ({_events(figures)} events); "
        f"upstream latency {args.latency_ms:g} ms."
    )
    return "\n".join(lines) + "\n\n" + settings


def _events(figures: dict[str, Figures]) -> int:
    return figures["direct"].events


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return (
        f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
        f"load average before the run {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one short round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="c=1 requests a round")
    parser.add_argument("--seconds", type=float, default=5.0, help="c=64 duration a round")
    parser.add_argument("--stream-repeat", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument(
        "--switchboard-only",
        action="store_true",
        help="Switchboard and the direct baseline only (quicker A/B runs of one change)",
    )
    parser.add_argument("--profile", action="store_true", help="pyinstrument on Switchboard")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.seconds, args.stream_repeat = 1, 100, 2.0, 1
    started = datetime.now(UTC)
    host = machine()
    with running_targets(args) as targets:
        figures = asyncio.run(measure(targets, args))
    table = render(figures, args)
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, {host}\n")
    print(table)


if __name__ == "__main__":
    main()
