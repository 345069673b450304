"""The benchmark's fake OpenAI-style upstream: fast enough never to be the bottleneck.

aiohttp's server (C-accelerated parser), one process. A whole answer after `--latency-ms`;
with `"stream": true`, `--chunks` content events `--interval-ms` apart, then a usage event and
`[DONE]`, as OpenAI sends them with `stream_options.include_usage`.

    python -m bench.upstream --port 9100 --latency-ms 0 --chunks 20 --interval-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

_USAGE = {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32}


def _completion(model: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": _USAGE,
        }
    ).encode()


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def build_app(*, latency_s: float, chunks: int, interval_s: float) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = str(body.get("model", "bench"))
        if latency_s:
            await asyncio.sleep(latency_s)
        if body.get("stream") is not True:
            return web.Response(body=_completion(model), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1}
        for index in range(chunks):
            delta = {"role": "assistant", "content": "tok "} if index == 0 else {"content": "tok "}
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            await response.write(_event({**base, "model": model, "choices": [choice]}))
            if interval_s:
                await asyncio.sleep(interval_s)
        usage = {**_USAGE, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        await response.write(_event({**base, "model": model, "choices": [], "usage": usage}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    args = parser.parse_args()
    app = build_app(
        latency_s=args.latency_ms / 1000, chunks=args.chunks, interval_s=args.interval_ms / 1000
    )
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
