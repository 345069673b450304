"""The shared outbound client: it carries nothing from one upstream reply into the next call,
and hands over every byte an upstream sent before its connection broke."""

from __future__ import annotations

import asyncio

import httpx
from aiohttp import web

from gateway import outbound
from tests.gateway.late_reading import until_the_transport_saw_the_break


def test_it_sends_no_cookie_an_upstream_set_on_an_earlier_reply() -> None:
    async def set_cookie(request: web.Request) -> web.Response:
        response = web.Response(text="set")
        response.set_cookie("upstream_session", "first-customer", path="/")
        return response

    async def echo_cookie(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Cookie", ""))

    async def scenario() -> tuple[str, str, str]:
        app = web.Application()
        app.router.add_get("/set", set_cookie)
        app.router.add_get("/echo", echo_cookie)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            http = outbound.client()
            first = await http.get(f"http://127.0.0.1:{port}/set")
            second = await http.get(f"http://127.0.0.1:{port}/echo")
            # whole answers go through the same pool's aiohttp session directly
            async with outbound.session().get(f"http://127.0.0.1:{port}/echo") as third:
                direct = await third.text()
            await http.aclose()
            return first.headers.get("set-cookie", ""), second.text, direct
        finally:
            await runner.cleanup()

    set_header, cookie_sent, cookie_sent_directly = asyncio.run(scenario())

    assert "upstream_session=first-customer" in set_header  # the upstream did set one
    assert cookie_sent == ""
    assert cookie_sent_directly == ""


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
        lines: list[str] = []
        error: type[BaseException] | None = None
        try:
            http = outbound.client()
            request = http.build_request("GET", f"http://127.0.0.1:{port}/events")
            response = await http.send(request, stream=True)
            try:
                await until_the_transport_saw_the_break(response)  # the reader comes late
                async for line in response.aiter_lines():
                    lines.append(line)
            except httpx.HTTPError as exc:
                error = type(exc)
            finally:
                await response.aclose()
                await http.aclose()
        finally:
            server.close()
            await server.wait_closed()
        return [line for line in lines if line], error

    lines, error = asyncio.run(scenario())

    assert lines == EVENTS
    assert error is not None and issubclass(error, httpx.ReadError)


def test_a_loops_client_is_closed_when_the_loop_ends() -> None:
    async def use_the_client() -> httpx.AsyncClient:
        return outbound.client()

    http = asyncio.run(use_the_client())

    assert http.is_closed


def test_a_finished_loop_is_not_kept_by_the_client_registry() -> None:
    async def use_the_client() -> asyncio.AbstractEventLoop:
        outbound.client()
        return asyncio.get_running_loop()

    loop = asyncio.run(use_the_client())

    assert loop not in outbound._clients
