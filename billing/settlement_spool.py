"""The settlement spool: where a request's usage waits while the database cannot take it.

The gateway settles each request with `usage_settle`. When PostgreSQL is unreachable at that
moment (and stays so while the request waits BILLING_SETTLE_WAIT_SECONDS, see
gateway/settlement.py), the request's `MeteredRequest` is written here instead, and replayed
into `usage_settle` once the database answers again: by the process that spooled it (every
BILLING_SPOOL_REPLAY_SECONDS until its spool is empty), by beat
(`billing.replay_spooled_settlements`, every 30 s) and by `manage.py replay_settlements`.

Where an entry goes, first that works:
1. the Redis list `sb:settlement-spool` (REDIS_URL): shared, so any process on any host
   replays it; as durable as Redis's persistence (compose.yaml runs it append-only);
2. a file in BILLING_SETTLEMENT_SPOOL_DIR, one JSON line per entry, appended under an
   exclusive lock and fsynced: replayed by processes that share the folder (one host).

Replay is at-least-once and safe to repeat or to run concurrently: `usage_settle` is
idempotent by request id (a second settle returns the first record and charges nothing), and
an entry leaves the spool only after it was settled. An entry that can never settle (not
JSON, or a settle that fails for a reason other than an outage) goes to the dead-letter list
`sb:settlement-spool:dead` or file `dead.jsonl`, logged at ERROR, for an operator.

The sweeper: a hold whose request is still in the spool after
BILLING_RESERVATION_SWEEP_AFTER_SECONDS (900 s by default, far longer than the replay takes
once the database is back) is voided like any other abandoned hold. The replay still charges
the request's usage: `usage_settle` charges a request whose reservation was already resolved
("the usage happened"). So a long outage never loses usage; it can only, for that request,
let the wallet go below zero by at most the request's cost (its hold was given back before
the charge came), and its key's spend-cap window does not count it (`_claim` moves the window
only for a held reservation).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from django.conf import settings
from django.db import InterfaceError, OperationalError
from redis.exceptions import RedisError

from billing.models import UsageRecord
from billing.money import Price, usage_cost_usd
from billing.services import MeteredRequest, usage_settle
from portal.redis_clients import redis_client

logger = logging.getLogger(__name__)

SPOOL_KEY = "sb:settlement-spool"
DEAD_LETTER_KEY = "sb:settlement-spool:dead"
SPOOL_FILE = "spool.jsonl"
DEAD_LETTER_FILE = "dead.jsonl"
_CLAIMED_PREFIX = "replaying-"
_FORMAT = 1


def database_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database could not be reached (try again later), as opposed to
    a settlement the database refused (retrying would not help)."""
    return isinstance(exc, OperationalError | InterfaceError)


def metered_encode(metered: MeteredRequest) -> str:
    """One spool entry: the MeteredRequest as JSON, amounts as decimal strings (exact)."""
    fields = asdict(metered)
    fields["price"] = {name: _decimal_text(value) for name, value in fields["price"].items()}
    fields["status"] = str(metered.status)
    fields["usage_source"] = str(metered.usage_source)
    fields["charge_limit_usd"] = _decimal_text(metered.charge_limit_usd)
    return json.dumps({"format": _FORMAT, "metered": fields}, separators=(",", ":"))


def _decimal_text(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def metered_decode(line: str | bytes) -> MeteredRequest:
    """The MeteredRequest of a spool entry; ValueError (or KeyError) when it is not one."""
    entry = json.loads(line)
    if entry.get("format") != _FORMAT:
        raise ValueError(f"unknown spool entry format {entry.get('format')!r}")
    fields: dict[str, Any] = dict(entry["metered"])
    price = fields["price"]
    cache_write = price.get("cache_write_input_per_mtok_usd")
    fields["price"] = Price(
        input_per_mtok_usd=Decimal(price["input_per_mtok_usd"]),
        output_per_mtok_usd=Decimal(price["output_per_mtok_usd"]),
        cached_input_per_mtok_usd=Decimal(price["cached_input_per_mtok_usd"]),
        cache_write_input_per_mtok_usd=None if cache_write is None else Decimal(cache_write),
    )
    fields["status"] = UsageRecord.Status(fields["status"])
    fields["usage_source"] = UsageRecord.UsageSource(fields["usage_source"])
    limit = fields.get("charge_limit_usd")
    fields["charge_limit_usd"] = None if limit is None else Decimal(limit)
    return MeteredRequest(**fields)


def spooled_usage_record(metered: MeteredRequest) -> UsageRecord:
    """The usage record a spooled request will have once replayed, unsaved: what the gateway
    answers with meanwhile (its charge is the same rule `usage_settle` applies)."""
    return UsageRecord(
        request_id=metered.request_id,
        organization_id=metered.organization_id,
        api_key_id=metered.api_key_id,
        model=metered.model,
        provider=metered.provider,
        upstream_model=metered.upstream_model,
        attempts=metered.attempts,
        status=metered.status,
        http_status=metered.http_status,
        input_tokens=metered.input_tokens,
        output_tokens=metered.output_tokens,
        cached_input_tokens=metered.cached_input_tokens,
        cache_write_input_tokens=metered.cache_write_input_tokens,
        usage_source=metered.usage_source,
        cost_usd=usage_cost_usd(
            price=metered.price,
            input_tokens=metered.input_tokens,
            output_tokens=metered.output_tokens,
            cached_input_tokens=metered.cached_input_tokens,
            cache_write_input_tokens=metered.cache_write_input_tokens,
        ),
        latency_ms=metered.latency_ms,
        time_to_first_token_ms=metered.time_to_first_token_ms,
    )


def settlement_spool(*, metered: MeteredRequest) -> str:
    """Keep a request the database could not settle, for replay; returns where it went
    ("redis" or "file"). Raises OSError only when Redis and the disk both failed."""
    line = metered_encode(metered)
    if settings.REDIS_URL:
        try:
            redis_client(settings.REDIS_URL).lpush(SPOOL_KEY, line)
            return "redis"
        except RedisError as exc:
            logger.warning("settlement spool: Redis unavailable (%s), using the file", exc)
    try:
        _append_line(_spool_dir() / SPOOL_FILE, line)
    except OSError:
        # The last place this usage exists: the log, for an operator to settle by hand.
        logger.error("settlement spool: could not write %s", line)
        raise
    return "file"


@dataclass
class ReplayOutcome:
    """What one replay did."""

    settled: int = 0  # entries settled (or found already settled)
    dead: int = 0  # entries set aside for an operator
    remaining: bool = False  # entries still waiting (the database or Redis is still down)


def spooled_settlements_replay() -> ReplayOutcome:
    """Settle every spooled request this process can reach (the Redis list, then the files of
    BILLING_SETTLEMENT_SPOOL_DIR). Stops at the first sign that the database is still down,
    keeping that entry and the rest for the next replay."""
    outcome = ReplayOutcome()
    try:
        if settings.REDIS_URL:
            _replay_redis(outcome)
        _replay_files(outcome)
    except _DatabaseStillDown:
        outcome.remaining = True
    if outcome.settled or outcome.dead:
        logger.info(
            "settlement spool: %d replayed, %d set aside%s",
            outcome.settled,
            outcome.dead,
            ", more waiting" if outcome.remaining else "",
        )
    return outcome


class _DatabaseStillDown(Exception):
    pass


def _settled(line: str | bytes) -> bool:
    """Settle one entry: True when it is done, False when it belongs in the dead letters;
    raises _DatabaseStillDown to stop the replay."""
    try:
        metered = metered_decode(line)
    except (ValueError, KeyError, TypeError):
        logger.error("settlement spool: not a spool entry, set aside: %r", line)
        return False
    try:
        usage_settle(metered=metered)
    except Exception as exc:
        if database_unavailable(exc):
            raise _DatabaseStillDown from exc
        logger.exception(
            "settlement spool: request %s cannot settle, set aside", metered.request_id
        )
        return False
    return True


def _replay_redis(outcome: ReplayOutcome) -> None:
    client = redis_client(settings.REDIS_URL)
    try:
        while (raw := client.lindex(SPOOL_KEY, -1)) is not None:  # the oldest (LPUSH'd first)
            if _settled(raw):
                outcome.settled += 1
            else:
                client.lpush(DEAD_LETTER_KEY, raw)
                outcome.dead += 1
            # Only now does it leave the spool; a concurrent replayer that settled it too
            # charged nothing more (the unique request id), and removed it already.
            client.lrem(SPOOL_KEY, -1, cast(str, raw))  # bytes: removed byte for byte
    except RedisError as exc:
        logger.warning("settlement spool: Redis unavailable for the replay (%s)", exc)
        outcome.remaining = True


def _replay_files(outcome: ReplayOutcome) -> None:
    folder = _spool_dir()
    if not folder.is_dir():
        return
    _claim_spool_file(folder)
    for claimed in sorted(folder.glob(f"{_CLAIMED_PREFIX}*.jsonl")):
        try:
            handle = claimed.open("rb")
        except FileNotFoundError:
            continue  # another replayer finished it
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                outcome.remaining = True  # another replayer is on it
                continue
            if not claimed.exists():
                continue
            for line in handle.read().splitlines():
                if not line.strip():
                    continue
                # _DatabaseStillDown leaves the file as it is: the entries already settled
                # are found settled next time.
                if _settled(line):
                    outcome.settled += 1
                else:
                    _append_line(folder / DEAD_LETTER_FILE, line.decode(errors="replace"))
                    outcome.dead += 1
            claimed.unlink()


def _claim_spool_file(folder: Path) -> None:
    """Move the spool file aside for replay, under the writers' lock: a writer appends only
    to the file the spool's name still points at, so nothing is written to a claimed file."""
    path = folder / SPOOL_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _names(path, fd) and os.fstat(fd).st_size > 0:
            os.rename(path, folder / f"{_CLAIMED_PREFIX}{uuid.uuid4().hex}.jsonl")
    finally:
        os.close(fd)


def _names(path: Path, fd: int) -> bool:
    """Whether `path` is still the file open as `fd` (not renamed or removed since)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _append_line(path: Path, line: str) -> None:
    """Append one line durably: under an exclusive lock, to the file `path` names at that
    moment (a replayer may have moved the previous one aside), then fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (line.rstrip("\n") + "\n").encode()
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _names(path, fd):
                os.write(fd, data)
                os.fsync(fd)
                break
        finally:
            os.close(fd)  # releases the lock
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the file's name survives a power cut too
    finally:
        os.close(directory)


def _spool_dir() -> Path:
    return Path(settings.BILLING_SETTLEMENT_SPOOL_DIR)
