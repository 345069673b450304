"""Reading a provider's server-sent events (gateway/providers/sse.py `event_data`) from the body
as aiohttp hands it over: in pieces that cut events, lines and CRLF pairs anywhere."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
from aiohttp.base_protocol import BaseProtocol

from gateway.providers.sse import event_data
from gateway.selectors import RouteEntry

ROUTE = RouteEntry(provider="p", kind="openai", base_url="", api_key_env="", upstream_model="m")


def read_events(pieces: list[bytes]) -> list[Any]:
    """The events `event_data` reads from a body received as `pieces`, one read each (aiohttp's
    own StreamReader, fed as its protocol would feed it)."""

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        content = aiohttp.StreamReader(BaseProtocol(loop), 2**16, loop=loop)
        for piece in pieces:
            content.feed_data(piece)
        content.feed_eof()
        response = cast(aiohttp.ClientResponse, SimpleNamespace(content=content))
        return [data async for data in event_data(ROUTE, response)]

    return asyncio.run(scenario())


def test_it_reads_events_cut_anywhere_with_crlf_line_ends() -> None:
    body = (
        b': keep-alive\r\n\r\nevent: chunk\r\nid: 1\r\ndata: {"n": 1}\r\n\r\n'
        b'data: {"n":\r\ndata: 2}\r\n\r\ndata: {"n": 3}\r\n\r\ndata: [DONE]\r\n\r\n'
    )
    byte_by_byte = [body[i : i + 1] for i in range(len(body))]  # every cut, CR|LF included

    assert read_events(byte_by_byte) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert read_events([body]) == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_it_reads_a_last_event_whose_blank_line_never_came() -> None:
    assert read_events([b'data: {"n": 1}\n\n', b'data: {"n": 2}\n']) == [{"n": 1}, {"n": 2}]


def test_it_stops_at_done_whatever_follows() -> None:
    assert read_events([b'data: {"n": 1}\n\ndata: [DONE]\n\ndata: {"n": 2}\n\n']) == [{"n": 1}]
