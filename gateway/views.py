"""The `/v1/*` endpoints. Each reads top to bottom as DESIGN.md's request path."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar, cast

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from billing.models import UsageRecord
from billing.money import format_usd, usage_cost_usd
from billing.services import (
    InsufficientCredit,
    MeteredRequest,
    SpendCapExceeded,
    credit_reserve,
    reservation_checkpoint,
    reservation_void,
    usage_settle,
)
from gateway.auth import Caller, authenticate, bearer_token, client_host_of
from gateway.errors import (
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
from gateway.limits import limits_admit, limits_release
from gateway.metering import cap_max_tokens, worst_case
from gateway.providers import TokenUsage
from gateway.providers.base import StreamingAdapter, UpstreamStream, estimate_prompt_tokens
from gateway.requests import chat_request, read_json_body
from gateway.routing import ChosenRoute, serveable_routes
from gateway.selectors import ModelEntry, catalog_model, catalog_models
from gateway.streaming import client_wants_usage, relay_chat_stream

logger = logging.getLogger(__name__)

_reserve = sync_to_async(credit_reserve)
_void = sync_to_async(reservation_void)
_checkpoint = sync_to_async(reservation_checkpoint)
_settle = sync_to_async(usage_settle)
_NO_USAGE = TokenUsage(input_tokens=0, output_tokens=0)
_T = TypeVar("_T")


def _new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


_View = Callable[..., Coroutine[Any, Any, HttpResponseBase]]


def _openai_endpoint(method: str | None) -> Callable[[_View], _View]:
    """Give the handler a request id, refuse HTTP methods other than `method` (None: any),
    and answer every failure in OpenAI's error shape."""

    def decorate(handler: _View) -> _View:
        @csrf_exempt
        @functools.wraps(handler)
        async def endpoint(request: HttpRequest, **kwargs: Any) -> HttpResponseBase:
            request_id = _new_request_id()
            try:
                if method is not None and request.method != method:
                    raise MethodNotAllowed(f"Use {method} for {request.path}.")
                return await handler(request, request_id, **kwargs)
            except GatewayError as error:
                return error_response(error, request_id=request_id)
            except Exception:
                # Never a traceback to the caller; the log has it, under the request id.
                logger.exception("request %s failed", request_id)
                return error_response(
                    GatewayError("The gateway failed to handle this request."),
                    request_id=request_id,
                )

        return endpoint

    return decorate


async def _caller(request: HttpRequest) -> Caller:
    """Step 1 of every endpoint: the key in the Authorization header."""
    return await authenticate(
        bearer_token(request.headers.get("Authorization", "")), client_host=client_host_of(request)
    )


@_openai_endpoint("GET")
async def models(request: HttpRequest, request_id: str) -> HttpResponseBase:
    """GET /v1/models: the models the calling key may use, with their prices."""
    caller = await _caller(request)
    data = [_model_object(model) for model in await catalog_models() if caller.may_use(model.name)]
    return JsonResponse({"object": "list", "data": data}, headers={"x-request-id": request_id})


@_openai_endpoint("GET")
async def model(request: HttpRequest, request_id: str, model_id: str) -> HttpResponseBase:
    """GET /v1/models/{id}: one model, if the calling key may use it (404 otherwise)."""
    caller = await _caller(request)
    entry = await catalog_model(model_id)
    if entry is None or not caller.may_use(entry.name):
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    return JsonResponse(_model_object(entry), headers={"x-request-id": request_id})


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
    }


@_openai_endpoint("POST")
async def chat_completions(request: HttpRequest, request_id: str) -> HttpResponseBase:
    """POST /v1/chat/completions, answered whole or, with `"stream": true`, as server-sent
    events."""
    started = time.monotonic()
    # 1. Key
    caller = await _caller(request)
    # 2. Request
    model_name, body = chat_request(read_json_body(request))
    model = await catalog_model(model_name)
    if model is None:
        raise ModelNotFound(f"The model '{model_name}' does not exist.", param="model")
    if not caller.may_use(model.name):
        raise ModelNotAllowed(f"This key may not use the model '{model.name}'.", param="model")
    body, output_limit = cap_max_tokens(body, model)
    streaming = body.get("stream") is True
    # 3. Limits (released whatever happens next; by the stream's end when it streams)
    await limits_admit(api_key_id=caller.api_key_id, request_id=request_id, limits=caller.limits)
    tokens_used = 0
    released_by_stream = False
    try:
        # 4. Route
        routes = serveable_routes(model, streaming=streaming)
        # 5. Reserve the worst case, or 402
        bound = worst_case(body=body, body_bytes=len(request.body), output_limit=output_limit)
        await _reserve_or_refuse(
            request_id,
            caller,
            usage_cost_usd(
                price=model.price,
                input_tokens=bound.input_tokens,
                output_tokens=bound.output_tokens,
            ),
        )
        # 6. Forward, failing over to the next route before the first byte; a stream relays
        # and then settles (7.) when it ends, in gateway/streaming.py
        metering = _Metering(request_id, caller, model, routes[0], started)
        if streaming:
            upstream, metering = await _forwarded(
                metering,
                routes,
                lambda chosen: cast(StreamingAdapter, chosen.adapter).chat_completion_stream(
                    route=chosen.route, body=body, secret=chosen.secret
                ),
            )
            response = _streamed(metering, upstream, body)
            released_by_stream = True
            return response
        reply, metering = await _forwarded(
            metering,
            routes,
            lambda chosen: chosen.adapter.chat_completion(
                route=chosen.route, body=body, secret=chosen.secret
            ),
        )
        # 7. Settle
        record = await _record(metering, reply.usage)
        tokens_used = reply.usage.input_tokens + reply.usage.output_tokens
    finally:
        if not released_by_stream:
            await limits_release(
                api_key_id=caller.api_key_id,
                request_id=request_id,
                limits=caller.limits,
                tokens=tokens_used,
            )
    reply.body["model"] = model.name
    return JsonResponse(
        reply.body,
        headers={"x-request-id": request_id, "x-switchboard-cost-usd": format_usd(record.cost_usd)},
    )


@dataclass(frozen=True, slots=True)
class _Metering:
    """What settling a request needs to know about it, once it is routed and reserved."""

    request_id: str
    caller: Caller
    model: ModelEntry
    chosen: ChosenRoute
    started: float  # time.monotonic() when the request arrived
    attempts: int = 1  # routes tried so far, `chosen` included


async def _forwarded(
    metering: _Metering,
    routes: list[ChosenRoute],
    call: Callable[[ChosenRoute], Awaitable[_T]],
) -> tuple[_T, _Metering]:
    """Call the routes in order up to the first byte of an answer, at most GATEWAY_MAX_ATTEMPTS.

    A retryable failure (unreachable, 5xx, 429) moves on to the next route; the last failure
    is recorded uncharged. A refusal or a cancellation releases the hold: nothing was used.
    Returns the answer and the metering of the route that gave it.
    """
    tried = routes[: settings.GATEWAY_MAX_ATTEMPTS]
    for attempt, chosen in enumerate(tried, start=1):
        metering = dataclasses.replace(metering, chosen=chosen, attempts=attempt)
        try:
            return await call(chosen), metering
        except UpstreamFailed as failure:
            if failure.retryable and attempt < len(tried):
                logger.info(
                    "request %s: provider %s failed, trying the next route",
                    metering.request_id,
                    chosen.route.provider,
                )
                continue
            await _record(metering, _NO_USAGE, status=UsageRecord.Status.UPSTREAM_ERROR)
            raise
        except BaseException:
            # Cancelled (the client went away) or a bug: release the hold, nothing was used.
            await asyncio.shield(_void(request_id=metering.request_id))
            raise
    raise AssertionError("serveable_routes never returns an empty list")


def _streamed(
    metering: _Metering, upstream: UpstreamStream, body: dict[str, Any]
) -> StreamingHttpResponse:
    """The streamed answer: relayed as it arrives, checkpointed, settled when it ends."""
    route = metering.chosen.route
    caller = metering.caller

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
            await _record(
                metering,
                usage,
                status=UsageRecord.Status.OK if completed else UsageRecord.Status.INTERRUPTED,
            )
        finally:
            await limits_release(
                api_key_id=caller.api_key_id,
                request_id=metering.request_id,
                limits=caller.limits,
                tokens=usage.input_tokens + usage.output_tokens,
            )

    events = relay_chat_stream(
        upstream=upstream,
        model_name=metering.model.name,
        # The same estimate as a whole answer without usage (providers/base.py).
        prompt_tokens=estimate_prompt_tokens(body.get("messages", [])),
        pass_usage=client_wants_usage(body),
        checkpoint=checkpoint,
        finish=finish,
    )
    return StreamingHttpResponse(
        events,
        content_type="text/event-stream",
        headers={"x-request-id": metering.request_id, "cache-control": "no-cache"},
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
        raise PaymentRequired(
            "Your organisation's credit does not cover this request. Add credit, or lower "
            "max_tokens."
        ) from None
    except SpendCapExceeded as exc:
        resets = f" It resets at {exc.resets_at:%Y-%m-%d %H:%M} UTC." if exc.resets_at else ""
        raise SpendCapReached(
            f"This key's spend cap does not cover this request.{resets}"
        ) from None


async def _record(
    metering: _Metering,
    usage: TokenUsage,
    *,
    status: UsageRecord.Status = UsageRecord.Status.OK,
) -> UsageRecord:
    """Settle the request: usage record, charge and release of the hold, in one transaction."""
    failed = status == UsageRecord.Status.UPSTREAM_ERROR
    return await _settle(
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
            latency_ms=int((time.monotonic() - metering.started) * 1000),
            attempts=metering.attempts,
            price=metering.model.price,
        )
    )


@_openai_endpoint(None)
async def unknown_endpoint(request: HttpRequest, request_id: str, path: str = "") -> HttpResponse:
    """Any other `/v1/*` path: OpenAI's 404 shape rather than Django's HTML page."""
    raise UnknownEndpoint(f"Unknown endpoint: {request.method} {request.path}")
