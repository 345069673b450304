"""The shared outbound session: it carries nothing from one upstream reply into the next call,
and hands over every byte an upstream sent before its connection broke."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from gateway import outbound
from portal import event_loops
from tests.gateway.late_reading import until_the_transport_saw_the_break


def test_it_sends_no_cookie_an_upstream_set_on_an_earlier_reply() -> None:
    async def set_cookie(request: web.Request) -> web.Response:
        response = web.Response(text="set")
        response.set_cookie("upstream_session", "first-customer", path="/")
        return response

    async def echo_cookie(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Cookie", ""))

    async def scenario() -> tuple[str, str]:
        app = web.Application()
        app.router.add_get("/set", set_cookie)
        app.router.add_get("/echo", echo_cookie)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with outbound.session().get(f"http://127.0.0.1:{port}/set") as first:
                set_header = first.headers.get("set-cookie", "")
            async with outbound.session().get(f"http://127.0.0.1:{port}/echo") as second:
                return set_header, await second.text()
        finally:
            await runner.cleanup()

    set_header, cookie_sent = asyncio.run(scenario())

    assert "upstream_session=first-customer" in set_header  # the upstream did set one
    assert cookie_sent == ""


EVENTS = [f'data: {{"n": {n}}}' for n in range(5)]


async def _send_events_then_drop(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A raw HTTP/1.1 upstream: a chunked event stream, five events, then the connection closed
    without the terminating chunk (a crashed upstream)."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    for event in EVENTS:
        body = f"{event}\n\n".encode()
        writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
    await writer.drain()
    writer.close()


def test_it_hands_over_what_arrived_before_a_broken_connection_then_the_error() -> None:
    async def scenario() -> tuple[list[str], type[BaseException] | None]:
        server = await asyncio.start_server(_send_events_then_drop, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        received = b""
        error: type[BaseException] | None = None
        try:
            response = await outbound.session().get(f"http://127.0.0.1:{port}/events")
            try:
                await until_the_transport_saw_the_break(response)  # the reader comes late
                async for chunk in outbound.body_chunks(response):
                    received += chunk
            except aiohttp.ClientError as exc:
                error = type(exc)
            finally:
                response.release()
        finally:
            server.close()
            await server.wait_closed()
        return [line for line in received.decode().split("\n") if line], error

    lines, error = asyncio.run(scenario())

    assert lines == EVENTS
    assert error is not None and issubclass(error, aiohttp.ClientPayloadError)


def test_a_loops_session_is_closed_when_the_loop_ends() -> None:
    async def use_the_session() -> aiohttp.ClientSession:
        return outbound.session()

    http = asyncio.run(use_the_session())

    assert http.closed


def test_a_finished_loop_is_not_kept_by_the_session_registry() -> None:
    async def use_the_session() -> asyncio.AbstractEventLoop:
        outbound.session()
        return asyncio.get_running_loop()

    loop = asyncio.run(use_the_session())

    assert not event_loops._per_loop.get(loop)
