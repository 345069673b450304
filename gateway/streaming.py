"""Steps 6 and 7 of the request path for `"stream": true`: relay the upstream's chunks to the
client as they arrive, checkpoint the usage while they flow, and settle when the stream ends.

The stream ends in one of four ways, and each is settled exactly once (`finish`):
- normally: the upstream's `[DONE]`, passed on, after a `: cost_usd=…` comment with the charge;
- the upstream broke off midway, or sent an event its adapter cannot read: the client gets the
  charge comment and one last event in OpenAI's error shape (`stream_error_event`), and the
  stream closes cleanly;
- the client went away: Django cancels this iterator; the upstream request is closed;
- the process died: nothing runs here, and the sweeper charges the last checkpoint.
Usage is what the provider reported in its usage chunk when that arrived, otherwise an
estimate from the request and the text relayed so far.

The relay yields structured events (`StreamEvent`: chunk objects, the charge, the end), and
each API's encoder writes them once: `openai_events` here, the Messages API's translation in
gateway/messages.py, which would otherwise decode every chunk this module had just encoded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import (
    STREAM_FAILED,
    GatewayError,
    UpstreamFailed,
    UpstreamStreamBroken,
    stream_error_event,
)
from gateway.providers.base import (
    TokenUsage,
    UpstreamStream,
    content_text,
    estimate_tokens,
    reported_usage,
)
from gateway.providers.sse import EventObject

logger = logging.getLogger(__name__)

# How often a running stream writes its usage so far to the database (one UPDATE), bounding
# what a crashed process can lose.
CHECKPOINT_INTERVAL_SECONDS = 1.0

_DONE = b"data: [DONE]\n\n"
# The comment line that carries a stream's settled charge in USD, just before its last event.
COST_COMMENT_PREFIX = ": cost_usd="


@dataclass(frozen=True, slots=True)
class Charge:
    """The request's settled charge, in USD (a decimal string), sent just before the last
    event."""

    cost_usd: str


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """A stream's last event: it completed (`error` None), or broke off with `error`."""

    error: GatewayError | None = None


# What the relay yields: OpenAI chunk objects (the usage chunk among them), then perhaps the
# charge, then the end.
StreamEvent = dict[str, Any] | Charge | StreamEnd


def cost_comment(cost_usd: str) -> bytes:
    """The request's settled charge as a server-sent event comment, which every SSE client
    (the openai and anthropic SDKs included) skips: a stream's headers leave before its cost
    is known, and a client that did not ask for the usage chunk has nowhere else to read it."""
    return f"{COST_COMMENT_PREFIX}{cost_usd}\n\n".encode()


async def openai_events(events: AsyncIterator[StreamEvent]) -> AsyncIterator[bytes]:
    """The relay's events as OpenAI's server-sent events: `data: {chunk}`, the charge as a
    comment, `data: [DONE]` or the error in OpenAI's shape.

    The usage chunk and the charge, which the relay sends at the end right before the last
    event, go out with it as one write: each write to the client is a system call, as costly
    as the rest of a frame's work (issue 7). Closing this iterator (the client went away)
    closes the relay's, whose settlement then runs as for any stream.
    """
    dumps = json.dumps
    held = b""  # what goes out with the next event
    try:
        async for event in events:
            if isinstance(event, dict):
                raw = event.raw if type(event) is EventObject else None
                encoded = b"data: " + (raw or dumps(event).encode()) + b"\n\n"
                if _is_usage_chunk(event):
                    held += encoded
                    continue
            elif isinstance(event, Charge):
                held += cost_comment(event.cost_usd)
                continue
            elif isinstance(event, StreamEnd):
                encoded = _DONE if event.error is None else stream_error_event(event.error)
            if held:
                encoded, held = held + encoded, b""
            yield encoded
    finally:
        await close_events(events)


async def close_events(events: AsyncIterator[Any]) -> None:
    """Close the relay's iterator from an encoder's `finally`: an encoder closed at a `yield`
    (the client went away) does not close what it was reading by itself."""
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


def client_wants_usage(body: dict[str, Any]) -> bool:
    """Whether the client asked for the usage chunk (`stream_options.include_usage`)."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


@dataclass(slots=True)
class _Tally:
    """What has been relayed so far, to estimate the usage if the provider reports none."""

    prompt_tokens: int
    pieces: list[str] = field(default_factory=list)
    reported: TokenUsage | None = None

    def count(self, chunk: dict[str, Any]) -> None:
        relayed = ""
        for choice in chunk.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("text"), str):
                relayed += choice["text"]  # a legacy completion's chunk
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            relayed += content_text(delta.get("content"), thinking=True)
            relayed += str(delta.get("refusal") or "")
            for call in delta.get("tool_calls") or []:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict):
                    relayed += str(function.get("name") or "")
                    relayed += str(function.get("arguments") or "")
        if relayed:
            self.pieces.append(relayed)

    def usage(self) -> TokenUsage:
        if self.reported is not None:
            return self.reported
        # A provider sends at least one token a chunk, so the chunk count bounds the estimate
        # from below when the text is made of short tokens.
        return TokenUsage(
            input_tokens=self.prompt_tokens,
            output_tokens=max(estimate_tokens("".join(self.pieces)), len(self.pieces)),
            reported=False,
        )


def _rewrite(chunk: dict[str, Any], key: str, value: Any) -> None:
    """Set `chunk[key]` to `value` (delete it when None); the provider's bytes of the chunk
    no longer say the same, and will not be sent."""
    if value is None:
        del chunk[key]
    else:
        chunk[key] = value
    if type(chunk) is EventObject:
        chunk.raw = None


def _usage_chunk(chunk: dict[str, Any], usage: dict[str, Any], model_name: str) -> dict[str, Any]:
    """OpenAI's usage chunk (`choices: []`) for a content chunk that carried `usage`."""
    head = {name: chunk[name] for name in ("id", "object", "created") if name in chunk}
    return {**head, "model": model_name, "choices": [], "usage": usage}


def _is_usage_chunk(chunk: dict[str, Any]) -> bool:
    return chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


async def paced(
    chunks: AsyncIterator[dict[str, Any]],
    *,
    idle_timeout_seconds: float,
    on_first_chunk: Callable[[], object],
) -> AsyncIterator[dict[str, Any]]:
    """`chunks` as they come, ended by UpstreamStreamBroken when the provider stays silent
    longer than `idle_timeout_seconds` between two of them (the wait for the first one is the
    route's first-byte timeout, spent before the stream was returned). `on_first_chunk` runs
    when the first chunk arrives (the time to first token).

    One timer per stream (`_Silence`), not one per chunk: `asyncio.timeout` around each read
    (or `wait_for`, a task per read) scheduled and cancelled a timer for every frame, a few
    per cent of a streaming gateway's CPU (issue 7)."""
    iterator = aiter(chunks)
    silence = _Silence(idle_timeout_seconds)
    first = True
    try:
        while True:
            silence.waiting_since = silence.loop.time()
            try:
                chunk = await anext(iterator)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if silence.expired_here():
                    logger.warning("an upstream stream was silent for %ss", idle_timeout_seconds)
                    raise UpstreamStreamBroken("The provider's stream stalled.") from None
                raise
            finally:
                silence.waiting_since = None
            if first:
                first = False
                on_first_chunk()
            yield chunk
    finally:
        silence.stop()


class _Silence:
    """Cancels the reading task when a wait for the upstream's next chunk has lasted
    `seconds`, as `asyncio.timeout` would, with one timer that re-arms itself when it fires
    rather than one scheduled per chunk. The time the client takes between two chunks is not
    the upstream's silence, and does not count."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a stream is read in a task")
        self.task = task
        self.cancelling = task.cancelling()  # cancellations already asked for, not ours
        self.waiting_since: float | None = None  # loop time the current wait started
        self.expired = False
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(seconds, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        since = self.waiting_since
        # The loop may run a timer up to its clock's resolution early: a millisecond's grace.
        if since is not None and now - since >= self.seconds - 0.001:
            self.expired, self.timer = True, None
            self.task.cancel()
            return
        # Between two waits (the client's time, not the upstream's): a full period from now.
        start = now if since is None else since
        self.timer = self.loop.call_at(start + self.seconds, self._check)

    def expired_here(self) -> bool:
        """Whether the cancellation being handled is this timer's (and no one else's)."""
        return self.expired and self.task.uncancel() <= self.cancelling

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


async def relay_chat_stream(
    *,
    upstream: UpstreamStream,
    model_name: str,
    prompt_tokens: int,
    pass_usage: bool,
    checkpoint: Callable[[TokenUsage], Awaitable[object]],
    finish: Callable[[TokenUsage, bool], Awaitable[object]],
    settled_cost: Callable[[], str | None] | None = None,
) -> AsyncIterator[StreamEvent]:
    """The client's events, one chunk per upstream chunk, as each arrives, then the charge and
    the end (`StreamEvent`; `openai_events` writes them as OpenAI's server-sent events).

    Each chunk's `model` becomes the catalog name the client asked for; a chunk that needed no
    change keeps the provider's bytes (`EventObject`), which `openai_events` sends as they
    came, saving an encoding per frame (issue 7). The usage chunk is
    passed on only when `pass_usage` (the client asked for it); it is always read. While the
    stream runs, `checkpoint(usage so far)` runs at most once per CHECKPOINT_INTERVAL_SECONDS.
    However the stream ends, the upstream is closed and then `finish(usage, completed)` runs
    once, shielded from the cancellation that a client disconnect delivers.

    A usage chunk passed on is held until the request is settled, and then carries the
    request's charge as `usage.cost_usd` (a decimal string, from `settled_cost`): a stream
    cannot send it as a header. Whether or not the usage chunk was asked for, the charge also
    goes out (`Charge`, a comment in SSE) right before the last event.
    """
    tally = _Tally(prompt_tokens=prompt_tokens)
    clock = time.monotonic
    next_checkpoint = clock() + CHECKPOINT_INTERVAL_SECONDS
    ending: asyncio.Future[None] | None = None
    held_usage: dict[str, Any] | None = None
    try:
        try:
            async for chunk in upstream.chunks:
                if held_usage is not None:
                    # Something after the usage chunk: it was not the last after all.
                    yield held_usage
                    held_usage = None
                if _is_usage_chunk(chunk):
                    tally.reported = reported_usage(chunk["usage"])
                    if pass_usage:
                        _rewrite(chunk, "model", model_name)
                        held_usage = chunk
                    continue
                tally.count(chunk)
                usage = chunk.get("usage", 0)
                if isinstance(usage, dict):
                    # Mistral, Ollama and others report the usage on the last content chunk,
                    # not on one of its own: charged from it, and passed on (when asked for)
                    # as OpenAI's usage chunk, which the end of the stream completes.
                    tally.reported = reported_usage(usage) or tally.reported
                    if pass_usage:
                        held_usage = _usage_chunk(chunk, usage, model_name)
                    _rewrite(chunk, "usage", None)
                elif not pass_usage and usage is None:
                    _rewrite(chunk, "usage", None)  # the null `usage` that include_usage adds
                if chunk.get("model") != model_name:
                    _rewrite(chunk, "model", model_name)
                yield chunk
                if clock() >= next_checkpoint:
                    await _checkpoint_quietly(checkpoint, tally.usage())
                    next_checkpoint = clock() + CHECKPOINT_INTERVAL_SECONDS
        except UpstreamStreamBroken as error:
            completed, last_event = False, StreamEnd(error)
        except UpstreamFailed as unreadable:
            # An event the adapter could not read (UnreadableAnswer): the provider failed, not
            # the gateway, and past the first byte that is a broken stream.
            logger.warning("an upstream stream was unreadable: %s", unreadable.message)
            broken = UpstreamStreamBroken(unreadable.message)
            completed, last_event = False, StreamEnd(broken)
        except Exception:
            logger.exception("relaying a stream failed")
            failure = GatewayError(STREAM_FAILED)
            completed, last_event = False, StreamEnd(failure)
        else:
            completed, last_event = True, StreamEnd()
        # Settled before the last event goes out, so that a client that has read the whole
        # stream finds its usage recorded and its wallet charged.
        ending = asyncio.ensure_future(_end(upstream, finish, tally.usage(), completed))
        await asyncio.shield(ending)
        cost = settled_cost() if settled_cost is not None else None
        if held_usage is not None:
            if cost is not None:
                _rewrite(held_usage, "usage", {**held_usage["usage"], "cost_usd": cost})
            yield held_usage
        if cost is not None:
            yield Charge(cost)
        yield last_event
    finally:
        if ending is None:
            # The client went away (Django cancels this iterator, or closes it at a `yield`).
            ending = asyncio.ensure_future(_end(upstream, finish, tally.usage(), False))
        # Shielded: a second cancellation (the server shutting down) must not stop the
        # settlement halfway; the task runs to its end whatever happens to this iterator.
        await asyncio.shield(ending)


async def _checkpoint_quietly(
    checkpoint: Callable[[TokenUsage], Awaitable[object]], usage: TokenUsage
) -> None:
    # A checkpoint only protects against a crash; failing one must not fail the stream.
    try:
        await checkpoint(usage)
    except Exception:
        logger.exception("a stream checkpoint failed")


async def _end(
    upstream: UpstreamStream,
    finish: Callable[[TokenUsage, bool], Awaitable[object]],
    usage: TokenUsage,
    completed: bool,
) -> None:
    try:
        await upstream.close()
    except Exception:
        logger.exception("closing an upstream stream failed")
    try:
        await finish(usage, completed)
    except Exception:
        # The hold stays; the sweeper resolves it (from the checkpoint, if there was one).
        logger.exception("settling a stream failed")
