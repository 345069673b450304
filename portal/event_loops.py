"""Resources that belong to one event loop (an HTTP client's pool, database connections): made
on first use in that loop, and closed in that loop when it ends.

A server process runs one loop; tests and asgiref's `async_to_sync` run many, one after the
other. asyncio has no loop-close hook, but `asyncio.run` (which uvicorn, `async_to_sync` and
the tests use) runs `loop.shutdown_asyncgens()` before closing a loop, which closes every async
generator the loop saw start, in the loop, while it still runs. Each resource is given such a
generator, started at once (its first step awaits nothing): its `finally` closes the resource.
Without it, connections were never closed and were reported unclosed at process exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


@dataclass(slots=True)
class _Entry:
    resource: Any
    # Kept alive with the resource: a generator collected unfinished would be closed at once.
    closer: AsyncGenerator[None, None] | None = None


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, _Entry]] = (
    weakref.WeakKeyDictionary()
)


def loop_resource(
    key: Hashable, make: Callable[[], _T], close: Callable[[_T], Awaitable[Any]]
) -> _T:
    """The running loop's resource `key`: made by `make()` on first use, closed by
    `await close(resource)` in that loop when the loop ends."""
    loop = asyncio.get_running_loop()
    entries = _per_loop.setdefault(loop, {})
    entry = entries.get(key)
    if entry is None:
        entry = entries[key] = _Entry(resource=make())
        entry.closer = _close_when_the_loop_ends(loop, key, entry, close)
        # StopIteration: it reached its `yield`, started and registered with the running loop.
        with contextlib.suppress(StopIteration):
            entry.closer.asend(None).send(None)
    return entry.resource


async def _close_when_the_loop_ends(
    loop: asyncio.AbstractEventLoop,
    key: Hashable,
    entry: _Entry,
    close: Callable[[Any], Awaitable[Any]],
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        # The entry refers to its loop (through the resource, this generator's finalizer), so
        # the weak key alone would never let it go: a process that runs many loops would keep
        # every one of them.
        entries = _per_loop.get(loop, {})
        if entries.get(key) is entry:
            del entries[key]
        entry.closer = None
        await close(entry.resource)
