"""The gateway's database calls: one load per expired cache entry, however many wait for it."""

from __future__ import annotations

import asyncio

from gateway.database import load_once


def _concurrent_loads(keys: list[str]) -> tuple[list[int], int]:
    """Start a load for each of `keys` at once; their results, and how many loads ran."""

    async def scenario() -> tuple[list[int], int]:
        started: list[str] = []
        release = asyncio.Event()

        async def load() -> int:
            started.append("load")
            await release.wait()
            return len(started)

        waiters = [asyncio.ensure_future(load_once(key, load)) for key in keys]
        await asyncio.sleep(0)  # a yield, not a wait: every waiter has asked before any answer
        release.set()
        return list(await asyncio.gather(*waiters)), len(started)

    return asyncio.run(scenario())


def test_concurrent_loads_of_one_key_run_once():
    results, loads = _concurrent_loads(["catalog"] * 5)

    assert (results, loads) == ([1] * 5, 1)


def test_loads_of_different_keys_run_each():
    _, loads = _concurrent_loads(["api_key:a", "api_key:b"])

    assert loads == 2
