"""The `/v1/*` endpoints. Each reads top to bottom as DESIGN.md's request path."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, TypeVar, cast

from django.conf import settings
from django.http import StreamingHttpResponse

from billing.alerts import spend_cap_refusal_alert
from billing.models import UsageRecord
from billing.money import ZERO_USD, MoneyError, format_usd, usage_cost_usd
from billing.services import (
    InsufficientCredit,
    MeteredRequest,
    SpendCapExceeded,
    credit_reserve,
    credit_reserve_on_loop,
    reservation_checkpoint,
    reservation_void,
)
from gateway import capacity, metrics
from gateway.auth import Caller, authenticate, bearer_token, client_host_of
from gateway.database import db_call, on_loop_or_in_thread
from gateway.errors import (
    AnswerNotDelivered,
    GatewayError,
    MethodNotAllowed,
    ModelNotAllowed,
    ModelNotFound,
    PaymentRequired,
    SpendCapReached,
    UnknownEndpoint,
    UpstreamFailed,
    error_response,
)
from gateway.limits import Admission, limits_admit, limits_release
from gateway.metering import WorstCase, cap_max_tokens, worst_case
from gateway.providers import TokenUsage
from gateway.providers.base import (
    CompletionAdapter,
    EmbeddingAdapter,
    StreamingAdapter,
    UpstreamReply,
    UpstreamStream,
    estimate_prompt_tokens,
)
from gateway.requests import chat_request, completion_request, embedding_request, read_json_body
from gateway.route_health import route_failed, route_succeeded
from gateway.routing import Capability, ChosenRoute, serveable_routes
from gateway.selectors import ModelEntry, catalog_model, catalog_models
from gateway.settlement import usage_settle_durably
from gateway.streaming import (
    StreamEvent,
    client_wants_usage,
    openai_events,
    paced,
    relay_chat_stream,
)
from gateway.wire import COST_HEADER, Answer, GatewayRequest, JsonAnswer
from portal.logs import bind_request_id, new_request_id

logger = logging.getLogger(__name__)

_reserve = on_loop_or_in_thread(credit_reserve_on_loop, credit_reserve)
_void = db_call(reservation_void)
_checkpoint = db_call(reservation_checkpoint)
_alert_spend_cap = db_call(spend_cap_refusal_alert)
_NO_USAGE = TokenUsage(input_tokens=0, output_tokens=0)
_T = TypeVar("_T")


_View = Callable[..., Coroutine[Any, Any, Answer]]
_NOT_CHARGED = format_usd(ZERO_USD)


def _openai_endpoint(
    method: str | None,
    answer_error: Callable[..., JsonAnswer] = error_response,
) -> Callable[[_View], _View]:
    """Give the handler a request id, refuse HTTP methods other than `method` (None: any;
    HEAD too where it is GET: the handler leaves the body out, gateway/asgi.py), and answer
    every failure with `answer_error` (OpenAI's error shape by default)."""
    allowed = (method, "HEAD") if method == "GET" else (method,)
    allow = ", ".join(m for m in allowed if m)

    def decorate(handler: _View) -> _View:
        @functools.wraps(handler)
        async def endpoint(request: GatewayRequest, **kwargs: Any) -> Answer:
            request_id = new_request_id()
            bind_request_id(request_id)
            try:
                if method is not None and request.method not in allowed:
                    raise MethodNotAllowed(f"Use {method} for {request.path}.", allowed=allow)
                return await handler(request, request_id, **kwargs)
            except GatewayError as error:
                response = answer_error(error, request_id=request_id)
            except Exception as exc:
                # Never a traceback to the caller; the log has it, under the request id.
                logger.exception("request %s failed", request_id)
                response = answer_error(
                    capacity.unexpected_failure(exc),
                    request_id=request_id,
                )
            # A failed request is never charged (an upstream failure is recorded at 0), unless
            # it failed after it was settled: that error carries its charge (AnswerNotDelivered).
            response.headers.setdefault(COST_HEADER, _NOT_CHARGED)
            return response

        return endpoint

    return decorate


async def _caller(request: GatewayRequest) -> Caller:
    """Step 1 of every endpoint: the key in the Authorization header."""
    return await authenticate(
        bearer_token(request.headers.get("Authorization", "")), client_host=client_host_of(request)
    )


@_openai_endpoint("GET")
async def models(request: GatewayRequest, request_id: str) -> Answer:
    """GET /v1/models: the models the calling key may use, with their prices."""
    caller = await _caller(request)
    data = [_model_object(model) for model in await catalog_models() if _may_use(caller, model)]
    return JsonAnswer({"object": "list", "data": data}, headers={"x-request-id": request_id})


@_openai_endpoint("GET")
async def model(request: GatewayRequest, request_id: str, model_id: str) -> Answer:
    """GET /v1/models/{id}: one model, if the calling key may use it (404 otherwise)."""
    caller = await _caller(request)
    entry = await catalog_model(model_id)
    if entry is None or not _may_use(caller, entry):
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return JsonAnswer(_model_object(entry), headers={"x-request-id": request_id})


def _model_object(entry: ModelEntry) -> dict[str, Any]:
    """OpenAI's model object, plus what a caller of a paid gateway needs to know."""
    return {
        "id": entry.name,
        "object": "model",
        "created": 0,
        "owned_by": "switchboard",
        # Decimal strings: prices are exact, and JSON numbers would turn them into floats.
        "pricing": {
            "input_per_mtok_usd": format_usd(entry.price.input_per_mtok_usd),
            "output_per_mtok_usd": format_usd(entry.price.output_per_mtok_usd),
            "cached_input_per_mtok_usd": format_usd(entry.price.cached_input_per_mtok_usd),
            "cache_write_per_mtok_usd": format_usd(entry.price.cache_write_per_mtok_usd),
        },
        "context_length": entry.context_length,
        "max_output_tokens": entry.max_output_tokens,
        "aliases": list(entry.aliases),
    }


@_openai_endpoint("POST")
async def chat_completions(request: GatewayRequest, request_id: str) -> Answer:
    """POST /v1/chat/completions, answered whole or, with `"stream": true`, as server-sent
    events."""
    started = time.monotonic()
    # 1. Key
    caller = await _caller(request)
    # 2. Request
    model_name, body = chat_request(read_json_body(request))
    return await serve_chat(
        request, request_id, caller=caller, model_name=model_name, body=body, started=started
    )


class StreamFormat(Protocol):
    """Writes the pipeline's stream events (gateway/streaming.py) in another API's format;
    `prompt_tokens` is the prompt's estimate, the figure the request is charged when the
    provider reports none."""

    def __call__(
        self, events: AsyncIterator[StreamEvent], *, prompt_tokens: int
    ) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class ReplyFormat:
    """How an endpoint that runs the chat pipeline answers, when its API is not OpenAI's:
    `whole(chat.completion, usage)` is the reply body; `stream(stream events, prompt_tokens=
    the prompt's estimate)` the client's events (the usage chunk is always among them)."""

    whole: Callable[[dict[str, Any], TokenUsage], dict[str, Any]]
    stream: StreamFormat


async def serve_chat(
    request: GatewayRequest,
    request_id: str,
    *,
    caller: Caller,
    model_name: str,
    body: dict[str, Any],
    started: float,
    reply_format: ReplyFormat | None = None,
) -> Answer:
    """Steps 2 (model) to 7 of a chat request whose key and body are read: the one pipeline
    behind /v1/chat/completions and /v1/messages (`reply_format`: the latter's answers)."""
    model = await _model_for(caller, model_name)
    body, output_limit = cap_max_tokens(body, model)
    streaming = body.get("stream") is True
    return await _metered(
        request_id,
        caller,
        model,
        started,
        bound=worst_case(
            body=body, body_bytes=len(request.body), output_limit=output_limit, model=model
        ),
        call=_Call(
            needs=Capability.CHAT_STREAM if streaming else Capability.CHAT,
            answer=lambda chosen: chosen.adapter.chat_completion(
                route=chosen.route, body=body, secret=chosen.secret
            ),
            stream=(
                (
                    lambda chosen: cast(StreamingAdapter, chosen.adapter).chat_completion_stream(
                        route=chosen.route, body=body, secret=chosen.secret
                    )
                )
                if streaming
                else None
            ),
            # The same estimate as a whole answer without usage (providers/base.py).
            prompt_estimate=lambda: estimate_prompt_tokens(body.get("messages", [])),
            pass_usage=client_wants_usage(body) or reply_format is not None,
            reply_format=reply_format,
        ),
    )


# OpenAI's default completion limit for the legacy endpoint when the client sets none.
LEGACY_DEFAULT_MAX_TOKENS = 16


@_openai_endpoint("POST")
async def completions(request: GatewayRequest, request_id: str) -> Answer:
    """POST /v1/completions (legacy: a prompt in, text out), whole or streamed; only routes
    to OpenAI-style providers can serve it."""
    started = time.monotonic()
    # 1. Key
    caller = await _caller(request)
    # 2. Request
    model_name, body = completion_request(read_json_body(request))
    model = await _model_for(caller, model_name)
    body, output_limit = cap_max_tokens(body, model, default=LEGACY_DEFAULT_MAX_TOKENS)
    streaming = body.get("stream") is True
    return await _metered(
        request_id,
        caller,
        model,
        started,
        bound=worst_case(
            body=body, body_bytes=len(request.body), output_limit=output_limit, model=model
        ),
        call=_Call(
            needs=Capability.COMPLETIONS,
            answer=lambda chosen: cast(CompletionAdapter, chosen.adapter).completion(
                route=chosen.route, body=body, secret=chosen.secret
            ),
            stream=(
                (
                    lambda chosen: cast(CompletionAdapter, chosen.adapter).completion_stream(
                        route=chosen.route, body=body, secret=chosen.secret
                    )
                )
                if streaming
                else None
            ),
            prompt_estimate=lambda: estimate_prompt_tokens(body.get("prompt", "")),
            pass_usage=client_wants_usage(body),
        ),
    )


@_openai_endpoint("POST")
async def embeddings(request: GatewayRequest, request_id: str) -> Answer:
    """POST /v1/embeddings: charged for its input tokens at the model's input price."""
    started = time.monotonic()
    # 1. Key
    caller = await _caller(request)
    # 2. Request
    model_name, body = embedding_request(read_json_body(request))
    model = await _model_for(caller, model_name)
    return await _metered(
        request_id,
        caller,
        model,
        started,
        # No tokenizer emits more tokens than the bytes it reads (metering.py); no output.
        bound=WorstCase(input_tokens=len(request.body), output_tokens=0),
        call=_Call(
            needs=Capability.EMBEDDINGS,
            answer=lambda chosen: cast(EmbeddingAdapter, chosen.adapter).embeddings(
                route=chosen.route, body=body, secret=chosen.secret
            ),
        ),
    )


async def _model_for(caller: Caller, name: str) -> ModelEntry:
    """The catalog model a request names (by its name or an alias) that the key may use."""
    model = await catalog_model(name)
    if model is None:
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    if not _may_use(caller, model):
        raise ModelNotAllowed(f"This key may not use the model '{model.name}'.", param="model")
    return model


def _may_use(caller: Caller, model: ModelEntry) -> bool:
    """A key's allowed models may name a model or one of its aliases."""
    return any(caller.may_use(name) for name in (model.name, *model.aliases))


@dataclass(frozen=True, slots=True)
class _Call:
    """What one endpoint asks of a route: the capability, and how to call the adapter."""

    needs: Capability
    answer: Callable[[ChosenRoute], Awaitable[UpstreamReply]]
    # Set when the client asked for a stream: opens it, up to its first byte.
    stream: Callable[[ChosenRoute], Awaitable[UpstreamStream]] | None = None
    # The prompt tokens charged when a stream reports no usage.
    prompt_estimate: Callable[[], int] = lambda: 0
    pass_usage: bool = False  # whether the client asked for a stream's usage chunk
    reply_format: ReplyFormat | None = None  # None: OpenAI's own answers


async def _metered(
    request_id: str,
    caller: Caller,
    model: ModelEntry,
    started: float,
    *,
    bound: WorstCase,
    call: _Call,
) -> Answer:
    """Steps 3 to 7 of the request path, the same for every endpoint: limits, route, reserve,
    forward with failover, settle. `bound` is the most tokens the request can be billed for;
    `started` is time.monotonic() when the request arrived."""
    # 3. Limits (released whatever happens next; by the stream's end when it streams)
    admission = await limits_admit(
        api_key_id=caller.api_key_id,
        request_id=request_id,
        limits=caller.limits,
        tokens=bound.input_tokens + bound.output_tokens,
    )
    tokens_used = 0
    released_by_stream = False
    try:
        # 4. Route
        routes = serveable_routes(model, needs=call.needs)
        # 5. Reserve the worst case, or 402
        held_usd = _worst_case_cost(model, bound)
        await _reserve_or_refuse(request_id, caller, held_usd)
        # 6. Forward, retrying or failing over before the first byte; a stream relays and
        # then settles (7.) when it ends, in gateway/streaming.py
        metering = _Metering(request_id, caller, model, routes[0], started, held_usd)
        if call.stream is not None:
            upstream, metering = await _forwarded(metering, routes, call.stream)
            response = _streamed(
                metering,
                upstream,
                admission=admission,
                prompt_tokens=call.prompt_estimate(),
                pass_usage=call.pass_usage,
                reply_format=call.reply_format,
            )
            released_by_stream = True
            return response
        reply, metering = await _forwarded(metering, routes, call.answer)
        # 7. Settle
        record = await _record(metering, reply.usage, first_token_at=time.monotonic())
        tokens_used = reply.usage.input_tokens + reply.usage.output_tokens
    finally:
        if not released_by_stream:
            await limits_release(
                api_key_id=caller.api_key_id,
                request_id=request_id,
                limits=caller.limits,
                admission=admission,
                tokens=tokens_used,
            )
    return _settled_answer(request_id, model, reply, record, call.reply_format)


def _settled_answer(
    request_id: str,
    model: ModelEntry,
    reply: UpstreamReply,
    record: UsageRecord,
    reply_format: ReplyFormat | None,
) -> JsonAnswer:
    """The client's answer to a request already settled: written after the settlement, which
    must come first (a crash between an answer and its settlement would leave it uncharged).
    Whatever fails in writing it is answered as AnswerNotDelivered, with the charge, never as
    a 500 that says 0."""
    cost_usd = format_usd(record.cost_usd)
    try:
        reply.body["model"] = model.name
        return JsonAnswer(
            reply_format.whole(reply.body, reply.usage) if reply_format else reply.body,
            headers={"x-request-id": request_id, COST_HEADER: cost_usd},
        )
    except Exception:
        logger.exception("request %s: its answer could not be written once settled", request_id)
        raise AnswerNotDelivered(cost_usd=cost_usd) from None


@dataclass(frozen=True, slots=True)
class _Metering:
    """What settling a request needs to know about it, once it is routed and reserved."""

    request_id: str
    caller: Caller
    model: ModelEntry
    chosen: ChosenRoute  # the route called last
    started: float  # time.monotonic() when the request arrived
    held_usd: Decimal  # its hold: the most it may be charged
    attempts: int = 0  # upstream calls so far (a route retried after Retry-After counts twice)


async def _forwarded(
    metering: _Metering,
    routes: list[ChosenRoute],
    call: Callable[[ChosenRoute], Awaitable[_T]],
) -> tuple[_T, _Metering]:
    """Call the routes in order up to the first byte of an answer, at most GATEWAY_MAX_ATTEMPTS
    calls in all.

    A retryable failure (unreachable, timed out, 5xx, 429) moves on to the next route, except
    a 429 or 503 whose Retry-After is at most GATEWAY_MAX_RETRY_AFTER_SECONDS: the same route
    is called again after that wait. Each outcome counts towards the route's health
    (gateway/route_health.py). The last failure is recorded uncharged. A refusal or a
    cancellation releases the hold: nothing was used. Returns the answer and the metering of
    the route that gave it.
    """
    index = 0
    try:
        while True:
            chosen = routes[index]
            metering = dataclasses.replace(metering, chosen=chosen, attempts=metering.attempts + 1)
            try:
                answer = await metrics.upstream_timed(call(chosen))
                route_succeeded(chosen.route)
                return answer, metering
            except UpstreamFailed as failure:
                if failure.retryable:
                    route_failed(chosen.route)
                wait = failure.retry_after_seconds
                same_route = wait is not None and wait <= settings.GATEWAY_MAX_RETRY_AFTER_SECONDS
                following = index if same_route else index + 1
                if (
                    not failure.retryable
                    or metering.attempts >= settings.GATEWAY_MAX_ATTEMPTS
                    or following >= len(routes)
                ):
                    last_failure = failure
                    break
                logger.info(
                    "request %s: provider %s failed, %s",
                    metering.request_id,
                    chosen.route.provider,
                    f"retrying it in {wait}s" if same_route else "trying the next route",
                )
                index = following
                if same_route and wait:
                    await asyncio.sleep(wait)
    except BaseException:
        # Refused, cancelled (the client went away) or a bug: release the hold, nothing was
        # used.
        await asyncio.shield(_void(request_id=metering.request_id))
        raise
    await _record(metering, _NO_USAGE, status=UsageRecord.Status.UPSTREAM_ERROR)
    raise last_failure


def _streamed(
    metering: _Metering,
    upstream: UpstreamStream,
    *,
    admission: Admission,
    prompt_tokens: int,
    pass_usage: bool,
    reply_format: ReplyFormat | None = None,
) -> StreamingHttpResponse:
    """The streamed answer: relayed as it arrives, checkpointed, settled when it ends."""
    route = metering.chosen.route
    caller = metering.caller
    first_token_at: list[float] = []
    settled_cost_usd: list[str] = []

    async def checkpoint(usage: TokenUsage) -> None:
        await _checkpoint(
            request_id=metering.request_id,
            model=metering.model.name,
            provider=route.provider,
            upstream_model=route.upstream_model,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            price=metering.model.price,
        )

    async def finish(usage: TokenUsage, completed: bool) -> None:
        try:
            record = await _record(
                metering,
                usage,
                status=UsageRecord.Status.OK if completed else UsageRecord.Status.INTERRUPTED,
                first_token_at=first_token_at[0] if first_token_at else None,
            )
            settled_cost_usd.append(format_usd(record.cost_usd))
        finally:
            await limits_release(
                api_key_id=caller.api_key_id,
                request_id=metering.request_id,
                limits=caller.limits,
                admission=admission,
                tokens=usage.input_tokens + usage.output_tokens,
            )

    events = relay_chat_stream(
        # A provider silent for longer than the route's idle timeout ends the stream.
        upstream=UpstreamStream(
            chunks=paced(
                upstream.chunks,
                idle_timeout_seconds=route.idle_timeout_seconds,
                on_first_chunk=lambda: first_token_at.append(time.monotonic()),
            ),
            close=upstream.close,
        ),
        model_name=metering.model.name,
        prompt_tokens=prompt_tokens,
        pass_usage=pass_usage,
        checkpoint=checkpoint,
        finish=finish,
        settled_cost=lambda: settled_cost_usd[0] if settled_cost_usd else None,
    )
    return StreamingHttpResponse(
        (
            reply_format.stream(events, prompt_tokens=prompt_tokens)
            if reply_format
            else openai_events(events)
        ),
        content_type="text/event-stream",
        headers={"x-request-id": metering.request_id, "cache-control": "no-cache"},
    )


def _worst_case_cost(model: ModelEntry, bound: WorstCase) -> Decimal:
    try:
        return usage_cost_usd(
            price=model.price, input_tokens=bound.input_tokens, output_tokens=bound.output_tokens
        )
    except MoneyError:  # more than any wallet could hold (say, n in the quintillions)
        raise PaymentRequired(_NOT_COVERED) from None


# The 402 when the wallet's available credit does not cover the request's worst case.
_NOT_COVERED = (
    "Your organisation's credit does not cover this request. Add credit, or lower max_tokens."
)


async def _reserve_or_refuse(request_id: str, caller: Caller, amount_usd: Decimal) -> None:
    try:
        await _reserve(
            request_id=request_id,
            organization_id=caller.organization_id,
            api_key_id=caller.api_key_id,
            amount_usd=amount_usd,
            spend_cap=caller.spend_cap,
        )
    except InsufficientCredit:
        raise PaymentRequired(_NOT_COVERED) from None
    except SpendCapExceeded as exc:
        if caller.spend_cap is not None:
            try:
                # Once per key and window; no query once this process has seen it. The mail
                # goes through Celery after commit, never on this path.
                await _alert_spend_cap(api_key_id=caller.api_key_id, window=caller.spend_cap.window)
            except Exception:  # an alert must never change the answer: 402 all the same
                logger.exception(
                    "could not record the spend-cap alert of key %s", caller.api_key_id
                )
        resets = f" It resets at {exc.resets_at:%Y-%m-%d %H:%M} UTC." if exc.resets_at else ""
        raise SpendCapReached(
            f"This key's spend cap does not cover this request.{resets}"
        ) from None


async def _record(
    metering: _Metering,
    usage: TokenUsage,
    *,
    status: UsageRecord.Status = UsageRecord.Status.OK,
    first_token_at: float | None = None,  # time.monotonic() of the first token, if one came
) -> UsageRecord:
    """Settle the request: usage record, charge and release of the hold, in one transaction
    (spooled for replay when the database is down: gateway/settlement.py)."""
    failed = status == UsageRecord.Status.UPSTREAM_ERROR
    record = await usage_settle_durably(
        metered=MeteredRequest(
            request_id=metering.request_id,
            api_key_id=metering.caller.api_key_id,
            organization_id=metering.caller.organization_id,
            model=metering.model.name,
            provider=metering.chosen.route.provider,
            upstream_model=metering.chosen.route.upstream_model,
            status=status,
            http_status=UpstreamFailed.status if failed else 200,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            cache_write_input_tokens=usage.cache_write_input_tokens,
            usage_source=(
                UsageRecord.UsageSource.REPORTED
                if usage.reported
                else UsageRecord.UsageSource.ESTIMATED
            ),
            latency_ms=_ms_since(metering.started),
            time_to_first_token_ms=(
                None if first_token_at is None else _ms_since(metering.started, first_token_at)
            ),
            attempts=metering.attempts,
            price=metering.model.price,
            charge_limit_usd=metering.held_usd,
        )
    )
    try:
        metrics.request_finished(record, started=metering.started)
    except Exception:  # the request is settled: a metric must never change its answer
        logger.exception("request %s: counting it in the metrics failed", metering.request_id)
    return record


def _ms_since(started: float, until: float | None = None) -> int:
    return int(((time.monotonic() if until is None else until) - started) * 1000)


@_openai_endpoint(None)
async def unknown_endpoint(request: GatewayRequest, request_id: str) -> Answer:
    """Any other `/v1/*` path: OpenAI's 404 shape rather than Django's HTML page."""
    raise UnknownEndpoint(f"Unknown endpoint: {request.method} {request.path}")
