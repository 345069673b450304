"""The rate limits' Redis client (gateway/redis_pipe.py) against a real redis-server of each
test's own: pipelined callers get their own replies, scripts survive SCRIPT FLUSH, a closed,
frozen or cut connection fails its callers at once and the next call connects again."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Iterator

import pytest
import redis

from gateway.redis_pipe import (
    LuaScript,
    PipelinedRedis,
    RedisAddress,
    RedisConnectionLost,
    RedisPipeError,
    RedisTimedOut,
    _Connection,
    background_settled,
    encode_command,
    script_runner,
)
from tests.chaos.run import Redis
from tests.ops.tcp_proxy import TcpProxy

ECHO = LuaScript("return ARGV[1]")
COUNT = LuaScript("return redis.call('INCRBY', KEYS[1], ARGV[1])")


@pytest.fixture
def server(tmp_path) -> Iterator[Redis]:
    """A redis-server of this test's own: it may be frozen, its clients killed."""
    server = Redis(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
        server.stop()


def admin(server: Redis, **options: object) -> redis.Redis:
    return redis.Redis(port=server.port, **options)  # type: ignore[arg-type]


def pipe(port: int, *, read_timeout_seconds: float = 5.0, **address: object) -> PipelinedRedis:
    fields: dict[str, object] = {"host": "127.0.0.1", "port": port, "db": 0}
    fields |= {"username": None, "password": None} | address
    return PipelinedRedis(
        RedisAddress(**fields),  # type: ignore[arg-type]
        connect_timeout_seconds=5.0,
        read_timeout_seconds=read_timeout_seconds,
    )


def test_concurrent_callers_share_one_connection_and_each_gets_its_own_reply(server):
    async def scenario() -> tuple[list[bytes], int]:
        client = pipe(server.port)
        replies = await asyncio.gather(*(client.run_script(ECHO, [], [n]) for n in range(300)))
        return replies, len(admin(server).client_list())

    replies, connections = asyncio.run(scenario())

    assert replies == [str(n).encode() for n in range(300)]
    assert connections == 2  # ours and admin's


def test_a_cancelled_caller_leaves_the_following_replies_to_their_own_callers(server):
    async def scenario() -> list[bytes]:
        client = pipe(server.port)
        await client.run_script(ECHO, [], ["connected"])
        first = asyncio.ensure_future(client.run_script(ECHO, [], ["first"]))
        cancelled = asyncio.ensure_future(client.run_script(ECHO, [], ["cancelled"]))
        last = asyncio.ensure_future(client.run_script(ECHO, [], ["last"]))
        await asyncio.sleep(0)  # each has written its command and waits for its reply
        cancelled.cancel()
        return [await first, await last, await client.run_script(ECHO, [], ["after"])]

    assert asyncio.run(scenario()) == [b"first", b"last", b"after"]


def test_a_script_the_server_lost_runs_again(server):
    async def scenario() -> list[int]:
        client = pipe(server.port)
        first = await client.run_script(COUNT, ["counter"], [2])
        admin(server).script_flush()
        return [first, await client.run_script(COUNT, ["counter"], [2])]

    assert asyncio.run(scenario()) == [2, 4]


def test_a_connection_the_server_closed_is_replaced_on_the_next_call(server):
    async def scenario() -> bytes:
        client = pipe(server.port)
        await client.run_script(ECHO, [], ["before"])
        admin(server).client_kill_filter(skipme=True)  # every client but admin's
        return await client.run_script(ECHO, [], ["after"])

    assert asyncio.run(scenario()) == b"after"


def test_a_frozen_server_fails_every_waiting_caller_then_serves_again_once_it_thaws(server):
    assert server.process is not None

    async def scenario() -> tuple[list[object], bytes]:
        client = pipe(server.port, read_timeout_seconds=0.3)
        await client.run_script(ECHO, [], ["connected"])
        server.process.send_signal(signal.SIGSTOP)
        waiting = await asyncio.gather(
            *(client.run_script(ECHO, [], [n]) for n in range(5)), return_exceptions=True
        )
        server.process.send_signal(signal.SIGCONT)
        return waiting, await client.run_script(ECHO, [], ["thawed"])

    waiting, thawed = asyncio.run(scenario())

    assert [type(outcome) for outcome in waiting] == [RedisTimedOut] * 5
    assert thawed == b"thawed"


def test_a_cut_connection_fails_every_waiting_caller_at_once(server):
    assert server.process is not None
    proxy = TcpProxy(server.port).start()

    async def scenario() -> list[object]:
        # A read timeout far above the test's run: only the cut can end the calls.
        client = pipe(proxy.port, read_timeout_seconds=30)
        await client.run_script(ECHO, [], ["connected"])
        server.process.send_signal(signal.SIGSTOP)
        calls = [asyncio.ensure_future(client.run_script(ECHO, [], [n])) for n in range(5)]
        await asyncio.sleep(0)
        proxy.cut()  # and it refuses the one retry's connection
        return await asyncio.gather(*calls, return_exceptions=True)

    try:
        outcomes = asyncio.run(scenario())
    finally:
        proxy.cut()

    assert [type(outcome) for outcome in outcomes] == [RedisConnectionLost] * 5


def test_an_unreachable_server_fails_the_call(server):
    server.stop()

    with pytest.raises(RedisConnectionLost):
        asyncio.run(pipe(server.port).run_script(ECHO, [], ["anyone?"]))


def test_the_password_and_database_of_the_url_are_used(server):
    admin(server).config_set("requirepass", "s3cret/")
    url = f"redis://:s3cret%2F@127.0.0.1:{server.port}/3"

    async def scenario() -> int:
        return await script_runner(url).run_script(COUNT, ["in-db-3"], [7])

    assert asyncio.run(scenario()) == 7
    assert admin(server, password="s3cret/", db=3).get("in-db-3") == b"7"


def test_a_wrong_password_fails_the_call(server):
    admin(server).config_set("requirepass", "s3cret")

    with pytest.raises(RedisPipeError, match=r"WRONGPASS|invalid"):
        asyncio.run(pipe(server.port, password="wrong").run_script(ECHO, [], ["x"]))


def test_a_script_sent_soon_reaches_the_server_before_the_caller_goes_on(server):
    async def scenario() -> object:
        client = pipe(server.port)
        await client.run_script(ECHO, [], ["connected"])
        client.run_script_soon(COUNT, ["released"], [1])
        # No await in between: the loop has not run, yet another connection sees the count.
        return admin(server).get("released")

    assert asyncio.run(scenario()) == b"1"


def test_a_script_sent_soon_runs_again_after_the_server_lost_it(server):
    async def scenario() -> None:
        client = pipe(server.port)
        await client.run_script(ECHO, [], ["connected"])
        admin(server).script_flush()
        client.run_script_soon(COUNT, ["released"], [1])
        await client.run_script(ECHO, [], ["after"])  # NOSCRIPT has come back by now
        await background_settled()

    asyncio.run(scenario())

    assert admin(server).get("released") == b"1"


def test_a_url_this_client_does_not_speak_runs_through_redis_py(server):
    url = f"redis://127.0.0.1:{server.port}/0?protocol=2"

    async def scenario() -> tuple[bool, int]:
        runner = script_runner(url)
        return isinstance(runner, PipelinedRedis), await runner.run_script(COUNT, ["k"], [5])

    assert asyncio.run(scenario()) == (False, 5)


def test_a_reply_split_across_reads_is_read_whole():
    async def scenario() -> object:
        ours, theirs = socket.socketpair()
        with theirs:
            _, connection = await asyncio.get_running_loop().create_connection(
                lambda: _Connection(read_timeout_seconds=5), sock=ours
            )
            reply = connection.send(encode_command("EVALSHA", "…"), now=True)
            # As the loop would hand them over if they came one byte a segment.
            for byte in b"*3\r\n:12\r\n$5\r\nhello\r\n*2\r\n+OK\r\n$-1\r\n":
                connection.data_received(bytes([byte]))
            return await reply

    assert asyncio.run(scenario()) == [12, b"hello", ["OK", None]]


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://10.0.0.5", RedisAddress("10.0.0.5", 6379, 0, None, None)),
        ("redis://:p%40ss@cache:6380/2", RedisAddress("cache", 6380, 2, None, "p@ss")),
        ("redis://limits:secret@cache/1", RedisAddress("cache", 6379, 1, "limits", "secret")),
        ("rediss://cache:6380/0", None),  # TLS: redis-py's
        ("unix:///run/redis.sock", None),
        ("redis://cache:6379/0?socket_keepalive=true", None),
    ],
)
def test_the_urls_this_client_speaks(url, address):
    assert RedisAddress.from_url(url) == address
