"""Lua scripts on Redis over one pipelined connection per event loop: the rate limits' client.

Every request with limits runs two scripts (gateway/limits.py). Through redis-py each call went
through its connection pool, retry wrapper, command packer and an `asyncio.wait_for` timer, a
fifth of the gateway's CPU under load; here a call is a few bytes appended to one connection:

- one connection per event loop and Redis URL, shared by every caller: commands written in one
  loop iteration go out in one write (auto-pipelining) and replies come back in the order the
  commands were written, so each caller takes the next reply (FIFO);
- REDIS_CONNECT_TIMEOUT_SECONDS bounds the connect, REDIS_READ_TIMEOUT_SECONDS the replies
  to each write: one timer per connection watches the oldest unanswered write; when it is
  late, or the connection breaks, the connection is dropped and every caller waiting on it
  fails at once (none hangs, none gets another's reply). The next call connects again;
- a call whose connection broke or whose reply was late is tried once more on a new
  connection (the connection a Redis restart closed is replaced on the spot), as
  portal/redis_clients.py has redis-py do (a loaded host or a profiler's pauses can make a
  reply late once);
- a script's first run on a connection sends its text (EVAL, which also caches it in the
  server), the following ones its SHA-1 (EVALSHA); after NOSCRIPT (SCRIPT FLUSH) it is sent by
  EVAL again. So even a script's first run is one round trip, and ordered with the rest.

It speaks RESP2 over plain TCP: `redis://[[user]:password@]host[:port][/db]`. For other URLs
(`rediss://` TLS, `unix://`, query options) `script_runner` returns redis-py's client behind
the same two methods, so those deployments keep working at redis-py's cost.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from django.conf import settings
from redis.exceptions import NoScriptError, RedisError

from portal.event_loops import loop_resource
from portal.redis_clients import async_redis_client

# What a script's reply may hold: integers, strings (bulk: bytes; simple: str), nil, arrays.
Reply = Any
Arg = str | bytes | int | float


class RedisPipeError(Exception):
    """Redis did not run the command: unreachable, too slow, or it answered with an error."""


class RedisConnectionLost(RedisPipeError):
    """The connection could not be made, or broke before the reply came."""


class RedisTimedOut(RedisPipeError):
    """No reply within REDIS_READ_TIMEOUT_SECONDS."""


class RedisReplyError(RedisPipeError):
    """An error reply (`-ERR …`, `-NOSCRIPT …`)."""

    @property
    def noscript(self) -> bool:
        return str(self).startswith("NOSCRIPT")


@dataclass(frozen=True)
class LuaScript:
    """A script and the SHA-1 Redis knows it by."""

    text: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "sha", hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()
        )


class ScriptRunner(Protocol):
    async def run_script(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]
    ) -> Reply:
        """The script's reply; RedisPipeError when it could not run."""

    def run_script_soon(self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Send the script and return at once; its reply, or failure, is dropped."""

    async def close(self) -> None:
        """Close the connection (the event loop is ending)."""


def encode_command(*args: Arg) -> bytes:
    """A command in RESP: an array of bulk strings. str(float) is its shortest exact repr."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside a reply: wait for more bytes."""


def parse_reply(buffer: bytes | bytearray, start: int) -> tuple[Reply, int]:
    """One RESP2 reply at `start` of `buffer` and the offset after it. An error reply is
    returned as a RedisReplyError (not raised); _Incomplete when the reply is not all there;
    ValueError when the bytes are not RESP."""
    end = buffer.find(b"\r\n", start)
    if end < 0:
        raise _Incomplete
    kind = buffer[start]
    line = buffer[start + 1 : end]
    after = end + 2
    if kind == 0x3A:  # ':' integer
        return int(line), after
    if kind == 0x24:  # '$' bulk string
        length = int(line)
        if length < 0:
            return None, after
        if len(buffer) < after + length + 2:
            raise _Incomplete
        return bytes(buffer[after : after + length]), after + length + 2
    if kind == 0x2A:  # '*' array
        count = int(line)
        if count < 0:
            return None, after
        items = []
        for _ in range(count):
            item, after = parse_reply(buffer, after)
            items.append(item)
        return items, after
    if kind == 0x2B:  # '+' simple string
        return line.decode(), after
    if kind == 0x2D:  # '-' error
        return RedisReplyError(line.decode(errors="replace")), after
    raise ValueError(f"not a RESP2 reply: {bytes(buffer[start : start + 20])!r}")


class _Write:
    """One write of commands: how many of its replies are still to come, and by when."""

    __slots__ = ("due", "unanswered")

    def __init__(self, unanswered: int, due: float) -> None:
        self.unanswered = unanswered
        self.due = due  # loop time


class _Connection(asyncio.Protocol):
    """One TCP connection to Redis: commands out in order, replies matched to them in order."""

    def __init__(self, *, read_timeout_seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._read_timeout_seconds = read_timeout_seconds
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        # The futures of the commands queued or written and not answered yet, in order.
        self._waiting: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self._unsent: list[bytes] = []
        self._flush_scheduled = False
        # The writes not answered in full, in order: their replies are due within the read
        # timeout of the write (as redis-py's socket timeout counts from its read, after its
        # write), not of the call, which a busy loop may write only later.
        self._writes: collections.deque[_Write] = collections.deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self.closed = False
        # SHA-1s of the scripts sent by EVAL on this connection: the server caches them.
        self.scripts_sent: set[str] = set()

    def send(self, command: bytes, *, now: bool = False) -> asyncio.Future[Reply]:
        """Queue `command`; the future gets its reply. Written at the end of this loop
        iteration with every other command queued in it, or at once with `now`."""
        if self.closed:
            raise RedisConnectionLost("the connection to Redis is closed")
        reply: asyncio.Future[Reply] = self._loop.create_future()
        self._waiting.append(reply)
        self._unsent.append(command)
        if now:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return reply

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._unsent or self.closed or self._transport is None:
            return
        self._transport.write(b"".join(self._unsent))
        due = self._loop.time() + self._read_timeout_seconds
        self._writes.append(_Write(len(self._unsent), due))
        self._unsent.clear()
        if self._deadline_timer is None:
            self._deadline_timer = self._loop.call_at(due, self._check_deadline)

    def _check_deadline(self) -> None:
        # Replies come in order, so only the oldest unanswered write can be late first.
        self._deadline_timer = None
        if not self._writes or self.closed:
            return
        due = self._writes[0].due
        if self._loop.time() < due:
            self._deadline_timer = self._loop.call_at(due, self._check_deadline)
        else:
            self.fail(RedisTimedOut(f"Redis did not answer within {self._read_timeout_seconds} s"))

    def fail(self, error: RedisPipeError) -> None:
        """Drop the connection: every command waiting on it fails with `error`."""
        if self.closed:
            return
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        waiting, self._waiting = self._waiting, collections.deque()
        self._writes.clear()
        self._unsent.clear()
        for reply in waiting:
            if not reply.done():
                reply.set_exception(error)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a TCP connection's

    def data_received(self, data: bytes) -> None:
        received = self._received
        received += data
        start = 0
        try:
            while start < len(received):
                reply, start = parse_reply(received, start)
                if not self._writes:
                    raise ValueError("a reply to no command")
                write = self._writes[0]
                write.unanswered -= 1
                if not write.unanswered:
                    self._writes.popleft()
                waiter = self._waiting.popleft()
                if waiter.done():  # its caller was cancelled: the reply is nobody's
                    continue
                if isinstance(reply, RedisReplyError):
                    waiter.set_exception(reply)
                else:
                    waiter.set_result(reply)
        except _Incomplete:
            pass
        except ValueError as error:
            self.fail(RedisConnectionLost(f"Redis sent what this client cannot read: {error}"))
            return
        del received[:start]

    def eof_received(self) -> bool:
        return False  # close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionLost(f"the connection to Redis was lost ({exc or 'closed'})"))


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> RedisAddress | None:
        """The address in a `redis://` URL; None for what this client does not speak (TLS,
        unix sockets, query options)."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or parts.query or not parts.hostname:
            return None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            return None
        return cls(
            host=parts.hostname,
            port=parts.port or 6379,
            db=int(path or 0),
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )


class PipelinedRedis:
    """Scripts on one auto-pipelined connection (see the module's docstring). One per event
    loop: its connection belongs to the loop that made it."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        connect_timeout_seconds: float,
        read_timeout_seconds: float,
    ) -> None:
        self.address = address
        self._connect_timeout_seconds = connect_timeout_seconds
        self._read_timeout_seconds = read_timeout_seconds
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    async def run_script(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]
    ) -> Reply:
        try:
            return await self._run_once(script, keys, args)
        except (RedisConnectionLost, RedisTimedOut):
            return await self._run_once(script, keys, args)

    def run_script_soon(self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]) -> None:
        """Written to the connection before this returns (when it is up), so a command the
        caller sends after it, on any connection, reaches Redis after it. A broken connection,
        a late reply or NOSCRIPT is handled as run_script does, in a task of its own."""
        connection = self._connection
        if connection is None or connection.closed:
            _in_background(self.run_script(script, keys, args))
            return
        reply = connection.send(_script_command(connection, script, keys, args), now=True)
        reply.add_done_callback(lambda done: self._after_background(done, script, keys, args))

    def _after_background(
        self,
        reply: asyncio.Future[Reply],
        script: LuaScript,
        keys: Sequence[str],
        args: Sequence[Arg],
    ) -> None:
        error = None if reply.cancelled() else reply.exception()
        if isinstance(error, RedisConnectionLost | RedisTimedOut):
            _in_background(self._run_once(script, keys, args))  # the one retry
        elif isinstance(error, RedisReplyError) and error.noscript:
            _in_background(self._send(_eval(script, keys, args)))

    async def _run_once(self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connected()
        try:
            return await connection.send(_script_command(connection, script, keys, args))
        except RedisReplyError as error:
            if not error.noscript:
                raise
        return await self._send(_eval(script, keys, args))

    async def _send(self, command: bytes) -> Reply:
        connection = self._connection
        if connection is None or connection.closed:
            connection = await self._connected()
        return await connection.send(command)

    async def _connected(self) -> _Connection:
        # Callers arriving while a connection is being made wait for that one; the shield
        # keeps one caller's cancellation from cancelling it for the others.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connect_done)
        return await asyncio.shield(self._connecting)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._connection is not None:
            self._connection.fail(RedisConnectionLost("the event loop ended"))

    def _connect_done(self, connecting: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not connecting.cancelled():
            connecting.exception()  # retrieved here too: every waiter may have gone

    async def _connect(self) -> _Connection:
        address = self.address
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_seconds):
                _, connection = await loop.create_connection(
                    lambda: _Connection(read_timeout_seconds=self._read_timeout_seconds),
                    address.host,
                    address.port,
                )
        except (OSError, TimeoutError) as error:
            raise RedisConnectionLost(
                f"cannot connect to Redis at {address.host}:{address.port}: {error or 'timed out'}"
            ) from None
        handshake = []
        if address.password is not None:
            credentials = [address.username] if address.username else []
            handshake.append(
                connection.send(encode_command("AUTH", *credentials, address.password))
            )
        if address.db:
            handshake.append(connection.send(encode_command("SELECT", address.db)))
        outcomes = await asyncio.gather(*handshake, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                connection.fail(RedisConnectionLost("the connection to Redis is closed"))
                if isinstance(outcome, RedisReplyError):
                    raise RedisPipeError(f"Redis refused the connection's set-up: {outcome}")
                raise outcome
        self._connection = connection
        return connection


def _operands(keys: Sequence[str], args: Sequence[Arg]) -> list[Arg]:
    return [len(keys), *keys, *args]


def _script_command(
    connection: _Connection, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]
) -> bytes:
    if script.sha in connection.scripts_sent:
        return encode_command("EVALSHA", script.sha, *_operands(keys, args))
    connection.scripts_sent.add(script.sha)
    return _eval(script, keys, args)


def _eval(script: LuaScript, keys: Sequence[str], args: Sequence[Arg]) -> bytes:
    return encode_command("EVAL", script.text, *_operands(keys, args))


# Tasks of run_script_soon: referenced until done (the loop keeps only weak references).
_background: set[asyncio.Task[Any]] = set()


def _in_background(work: Coroutine[Any, Any, Any]) -> None:
    async def quietly() -> None:
        # The caller did not wait for it: a failure here is the same as a lost reply.
        with contextlib.suppress(RedisPipeError):
            await work

    task = asyncio.ensure_future(quietly())
    _background.add(task)
    task.add_done_callback(_background.discard)


async def background_settled() -> None:
    """Wait until every run_script_soon of this event loop that needed a task of its own is
    done (for tests)."""
    loop = asyncio.get_running_loop()
    # list(): another thread's loop may add to the set meanwhile (the copy is atomic).
    while pending := [t for t in list(_background) if t.get_loop() is loop and not t.done()]:
        await asyncio.wait(pending)


class _RedisPyScripts:
    """redis-py behind ScriptRunner, for the URLs PipelinedRedis does not speak."""

    def __init__(self, url: str) -> None:
        # Short timeouts and one retry (portal/redis_clients.py).
        self._client = async_redis_client(url)

    async def close(self) -> None:
        await self._client.aclose()

    async def run_script(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]
    ) -> Reply:
        try:
            try:
                return await self._client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self._client.eval(script.text, len(keys), *keys, *args)
        except RedisError as error:
            raise RedisPipeError(str(error)) from error

    def run_script_soon(self, script: LuaScript, keys: Sequence[str], args: Sequence[Arg]) -> None:
        _in_background(self.run_script(script, keys, args))


def script_runner(url: str) -> ScriptRunner:
    """This event loop's runner for `url`: PipelinedRedis, or redis-py for URLs it does not
    speak; closed when the loop ends (portal/event_loops.py)."""

    def make() -> ScriptRunner:
        address = RedisAddress.from_url(url)
        if address is None:
            return _RedisPyScripts(url)
        return PipelinedRedis(
            address,
            connect_timeout_seconds=settings.REDIS_CONNECT_TIMEOUT_SECONDS,
            read_timeout_seconds=settings.REDIS_READ_TIMEOUT_SECONDS,
        )

    return loop_resource((ScriptRunner, url), make, _close)


async def _close(runner: ScriptRunner) -> None:
    await runner.close()
