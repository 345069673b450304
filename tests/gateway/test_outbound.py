"""The shared outbound client carries nothing from one upstream reply into the next call."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway import outbound


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
            http = outbound.client()
            first = await http.get(f"http://127.0.0.1:{port}/set")
            second = await http.get(f"http://127.0.0.1:{port}/echo")
            await http.aclose()
            return first.headers.get("set-cookie", ""), second.text
        finally:
            await runner.cleanup()

    set_header, cookie_sent = asyncio.run(scenario())

    assert "upstream_session=first-customer" in set_header  # the upstream did set one
    assert cookie_sent == ""
