"""Step 3 of the request path: per-key rate limits, shared by every gateway process.

- requests per minute and tokens per minute: a sliding window of 60 one-second buckets;
  a request is admitted while the last 60 seconds hold fewer than the limit. For tokens, an
  admitted request holds its worst case (the bound its credit is reserved for) in its
  admission's bucket, which its end corrects to the tokens it used: requests in flight count,
  so however many arrive at once a key overshoots its TPM by one request's worth, never more;
- concurrent requests: a set of in-flight request ids; entries older than the reservation
  sweep bound are dropped, so a crashed process cannot leak capacity for ever.

With REDIS_URL set, the state lives in Redis: an admission (every check) and a release are one
atomic Lua script each, one round trip (run by its SHA-1, EVALSHA, on the pipelined connection
of gateway/redis_pipe.py). The answer does not wait for the release: it is written to Redis
before the answer goes out, and its reply is not awaited. Without REDIS_URL, the state is in
this process's memory (correct only for the single-process embedded mode). Keys with no
rate limits never touch Redis. If Redis is unreachable, limited keys are refused with 503
(failing closed): limits are not money, but an operator who set them wants them held. Money
is never at stake here: credit and spend caps are enforced in the database.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from django.conf import settings

from gateway.errors import RateLimited, ServiceUnavailable
from gateway.redis_pipe import LuaScript, RedisPipeError, ScriptRunner, script_runner

WINDOW_SECONDS = 60

# A refusal's Retry-After is when a retry is admitted if nothing else is counted meanwhile: the
# oldest buckets leave the window one by one until it holds less than the limit. Leaving the
# oldest alone is not enough when the minute went past its limit (the last request admitted
# under a TPM may use more than was left; a lowered limit): a retry then would be refused
# again.

# Lua: the sliding window of one-second buckets in hash `key`. `window` drops the buckets that
# left it and answers whether the last minute holds less than `limit`: {admitted (0/1), seconds
# until enough of its oldest buckets have left it for it to hold less (a refusal's
# Retry-After, above)}; `count` adds `amount` to this second's.
_WINDOW_FUNCTIONS = """
local function window(key, now, limit)
  local buckets = redis.call('HGETALL', key)
  local used, live = 0, {}
  for i = 1, #buckets, 2 do
    local second = tonumber(buckets[i])
    if second <= now - 60 then
      redis.call('HDEL', key, buckets[i])
    else
      local amount = tonumber(buckets[i + 1])
      used = used + amount
      live[#live + 1] = {second, amount}
    end
  end
  if used < limit then
    return {1, 0}
  end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  for _, bucket in ipairs(live) do
    used = used - bucket[2]
    if used < limit then return {0, bucket[1] + 60 - now} end
  end
  return {0, 60}
end

local function count(key, now, amount)
  redis.call('HINCRBY', key, tostring(now), amount)
  redis.call('EXPIRE', key, 61)
end
"""

# Every check of an admission in one round trip, in the order limits_admit documents: tokens,
# requests, then the in-flight set; only an admitted request is counted (a request refused by
# a later check must not use up the minute's requests), and holds its tokens.
# KEYS: tpm hash, rpm hash, in-flight set; ARGV: now (whole seconds), now (float seconds),
# TPM limit, RPM limit, concurrency limit (each -1: not limited), request id, entry lifetime,
# tokens to hold (0: none).
# Returns {0, 0} when admitted, else {1 (TPM) | 2 (RPM) | 3 (concurrency), retry after}.
_ADMIT_SCRIPT = LuaScript(
    _WINDOW_FUNCTIONS
    + """
local now = tonumber(ARGV[1])
if tonumber(ARGV[3]) >= 0 then
  local tpm = window(KEYS[1], now, tonumber(ARGV[3]))
  if tpm[1] == 0 then return {1, tpm[2]} end
end
if tonumber(ARGV[4]) >= 0 then
  local rpm = window(KEYS[2], now, tonumber(ARGV[4]))
  if rpm[1] == 0 then return {2, rpm[2]} end
end
local concurrency = tonumber(ARGV[5])
if concurrency >= 0 then
  local lifetime = tonumber(ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[2]) - lifetime)
  if redis.call('ZCARD', KEYS[3]) >= concurrency then return {3, 1} end
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[6])
  redis.call('EXPIRE', KEYS[3], lifetime)
end
if tonumber(ARGV[4]) >= 0 then
  count(KEYS[2], now, 1)
end
if tonumber(ARGV[8]) > 0 then
  count(KEYS[1], now, tonumber(ARGV[8]))
end
return {0, 0}
"""
)

# The end of a request in one round trip. KEYS: in-flight set, tpm hash; ARGV: request id,
# now (whole seconds), tokens used (0: none or not counted), the admission's second and the
# tokens it held there (0: none). A hold still in the window becomes the tokens used; once
# the window has left it, they are counted now.
_RELEASE_SCRIPT = LuaScript(
    _WINDOW_FUNCTIONS
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
local now, used, held = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[5])
if held > 0 and tonumber(ARGV[4]) > now - 60 and redis.call('HEXISTS', KEYS[2], ARGV[4]) == 1 then
  redis.call('HINCRBY', KEYS[2], ARGV[4], used - held)
elseif used > 0 then
  count(KEYS[2], now, used)
end
return 1
"""
)


@dataclass(frozen=True, slots=True)
class RateLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    @property
    def any(self) -> bool:
        return any(
            limit is not None
            for limit in (
                self.requests_per_minute,
                self.tokens_per_minute,
                self.max_concurrent_requests,
            )
        )


class _LocalState:
    """The embedded mode's limiter state: one event loop, so check-and-add cannot interleave."""

    def __init__(self) -> None:
        self.windows: dict[str, dict[int, int]] = {}
        self.in_flight: dict[str, dict[str, float]] = {}

    def window(self, key: str, now: int, limit: int) -> tuple[bool, int]:
        """The Lua `window`: drop the buckets that left the window; whether it holds less
        than `limit`, and if not, the seconds until it does (a refusal's Retry-After)."""
        buckets = self.windows.setdefault(key, {})
        for second in [s for s in buckets if s <= now - WINDOW_SECONDS]:
            del buckets[second]
        used = sum(buckets.values())
        if used < limit:
            return True, 0
        for second in sorted(buckets):
            used -= buckets[second]
            if used < limit:
                return False, second + WINDOW_SECONDS - now
        return False, WINDOW_SECONDS

    def count(self, key: str, now: int, amount: int) -> None:
        buckets = self.windows.setdefault(key, {})
        buckets[now] = buckets.get(now, 0) + amount

    def correct(self, key: str, now: int, used: int, admission: Admission) -> None:
        """The release script's TPM part: the hold becomes what was used."""
        buckets = self.windows.setdefault(key, {})
        held_in = admission.second
        if admission.tokens and held_in > now - WINDOW_SECONDS and held_in in buckets:
            buckets[held_in] += used - admission.tokens
        elif used:
            self.count(key, now, used)

    def enter(self, key: str, now: float, limit: int, request_id: str, lifetime: int) -> bool:
        flights = self.in_flight.setdefault(key, {})
        for stale in [r for r, started in flights.items() if started <= now - lifetime]:
            del flights[stale]
        if len(flights) >= limit:
            return False
        flights[request_id] = now
        return True


@dataclass(frozen=True, slots=True)
class Admission:
    """What limits_admit counted for a request, which limits_release corrects at its end."""

    second: int = 0  # the Unix second of the bucket that holds its tokens
    tokens: int = 0  # the tokens held there (its worst case, at most the TPM); 0: none


NO_LIMITS = RateLimits()
_NOTHING_HELD = Admission()
_local = _LocalState()


def _redis() -> ScriptRunner | None:
    # Short timeouts and one retry on a broken connection (gateway/redis_pipe.py): while Redis
    # is down a limited key is answered 503 at once, and served again as soon as Redis is back.
    url = settings.REDIS_URL
    return script_runner(url) if url else None


def _prefix(api_key_id: int) -> str:
    return f"sb:limits:{api_key_id}"


# The refusals of limits_admit, by the check that refused.
_TPM, _RPM, _CONCURRENCY = 1, 2, 3


def _admit_locally(
    prefix: str, limits: RateLimits, request_id: str, now: int, held: int
) -> tuple[int, int]:
    """The admission script on this process's state (the embedded mode)."""
    if limits.tokens_per_minute is not None:
        admitted, retry_after = _local.window(f"{prefix}:tpm", now, limits.tokens_per_minute)
        if not admitted:
            return _TPM, retry_after
    if limits.requests_per_minute is not None:
        admitted, retry_after = _local.window(f"{prefix}:rpm", now, limits.requests_per_minute)
        if not admitted:
            return _RPM, retry_after
    concurrency = limits.max_concurrent_requests
    lifetime = settings.BILLING_RESERVATION_SWEEP_AFTER_SECONDS
    if concurrency is not None and not _local.enter(
        f"{prefix}:inflight", time.time(), concurrency, request_id, lifetime
    ):
        return _CONCURRENCY, 1
    if limits.requests_per_minute is not None:
        _local.count(f"{prefix}:rpm", now, 1)
    if held:
        _local.count(f"{prefix}:tpm", now, held)
    return 0, 0


async def limits_admit(
    *, api_key_id: int, request_id: str, limits: RateLimits, tokens: int
) -> Admission:
    """Admit a request under its key's limits, or raise RateLimited (429, with Retry-After).

    Checked in order: tokens per minute, requests per minute, concurrency; the request counts
    against its requests per minute only once every check admitted it. With Redis, all in one
    script (one round trip). A request admitted here must be followed by `limits_release`
    when it ends, given what this returns. `tokens` is the most the request can use (its
    worst case): held against the key's tokens per minute while it runs.
    """
    if not limits.any:
        return _NOTHING_HELD
    prefix = _prefix(api_key_id)
    client = _redis()
    clock = time.time()
    now = int(clock)
    tpm = limits.tokens_per_minute
    # More than the whole minute's tokens refuses the next request just the same.
    held = 0 if tpm is None else max(0, min(tokens, tpm))
    if client is None:
        refused, retry_after = _admit_locally(prefix, limits, request_id, now, held)
    else:
        try:
            refused, retry_after = await client.run_script(
                _ADMIT_SCRIPT,
                [f"{prefix}:tpm", f"{prefix}:rpm", f"{prefix}:inflight"],
                [
                    now,
                    clock,
                    _or_unlimited(limits.tokens_per_minute),
                    _or_unlimited(limits.requests_per_minute),
                    _or_unlimited(limits.max_concurrent_requests),
                    request_id,
                    settings.BILLING_RESERVATION_SWEEP_AFTER_SECONDS,
                    held,
                ],
            )
        except RedisPipeError:
            raise ServiceUnavailable(
                "The rate limiter is unavailable; this key's limits cannot be checked."
            ) from None
    if refused == _TPM:
        raise RateLimited(
            f"This key's limit of {limits.tokens_per_minute} tokens per minute is reached.",
            retry_after_seconds=int(retry_after),
        )
    if refused == _RPM:
        raise RateLimited(
            f"This key's limit of {limits.requests_per_minute} requests per minute is reached.",
            retry_after_seconds=int(retry_after),
        )
    if refused == _CONCURRENCY:
        raise RateLimited(
            f"This key's limit of {limits.max_concurrent_requests} concurrent requests is reached.",
            retry_after_seconds=1,
        )
    return Admission(second=now, tokens=held)


async def limits_release(
    *, api_key_id: int, request_id: str, limits: RateLimits, admission: Admission, tokens: int
) -> None:
    """End an admitted request: free its concurrency slot and make its hold of the minute's
    tokens the `tokens` it used (0 for a request refused after its admission).

    Returns without waiting for Redis: the release is written to the connection before this
    returns (so a request that the caller's answer prompts reaches Redis after it, whichever
    process serves it), and nothing the caller does next can cancel it. A failure is not
    fatal: the slot expires with the sweep bound, and the minute counts the request's worst
    case rather than its use."""
    counted = tokens if limits.tokens_per_minute is not None and tokens > 0 else 0
    if limits.max_concurrent_requests is None and not counted and not admission.tokens:
        return  # no slot was taken (limits_admit takes one only under a concurrency limit)
    prefix = _prefix(api_key_id)
    client = _redis()
    now = int(time.time())
    if client is None:
        _local.in_flight.get(f"{prefix}:inflight", {}).pop(request_id, None)
        _local.correct(f"{prefix}:tpm", now, counted, admission)
        return
    client.run_script_soon(
        _RELEASE_SCRIPT,
        [f"{prefix}:inflight", f"{prefix}:tpm"],
        [request_id, now, counted, admission.second, admission.tokens],
    )


def _or_unlimited(limit: int | None) -> int:
    return -1 if limit is None else limit
