"""A gateway that reads an upstream's body late: after the upstream has sent it and dropped
the connection, and the gateway's aiohttp session has noticed (a loaded machine, made certain)."""

from __future__ import annotations

import asyncio
import time

import aiohttp


async def until_the_transport_saw_the_break(response: aiohttp.ClientResponse) -> None:
    """Return once aiohttp has recorded that `response`'s connection broke, so that everything
    the upstream sent is waiting in its buffer: a test must know the break is there before the
    gateway reads, or it would prove nothing."""
    content = response.content
    deadline = time.monotonic() + 10
    while content.exception() is None:
        assert time.monotonic() < deadline, "the upstream connection never broke"
        await asyncio.sleep(0.01)  # a poll on the reading loop, which must run to see the break
