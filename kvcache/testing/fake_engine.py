"""An instant OpenAI-compatible engine for the router's tests and benchmarks: real HTTP, no model.

It answers `/v1/completions` and `/v1/chat/completions` (JSON, or SSE with one write per chunk),
`/v1/models`, `/health`, and vLLM's load gauges on `/metrics`; it names itself in every answer's
`system_fingerprint` so a test sees where the router sent a request, and counts the streams a
client abandoned (the router must close them). `fail_status` makes it answer that status.

    python -m kvcache.testing.fake_engine --port 8001 --name e1 [--chunks 8 --chunk-delay-s 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class FakeEngineState:
    name: str
    chunks: int = 4
    chunk_delay_s: float = 0.0
    fail_status: int = 0
    running: int = 0
    requests: list[dict] = field(default_factory=list)
    abandoned_streams: int = 0


def _chunk(state: FakeEngineState, index: int, chat: bool) -> bytes:
    delta = {"delta": {"content": f" t{index}"}} if chat else {"text": f" t{index}"}
    body = {"id": "x", "object": "chunk", "system_fingerprint": state.name,
            "choices": [{"index": 0, **delta, "finish_reason": None}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def create_app(state: FakeEngineState) -> Starlette:
    async def generate(request: Request) -> Response:
        payload = await request.json()
        state.requests.append(payload)
        if state.fail_status:
            return JSONResponse({"error": {"message": "failing on purpose"}}, state.fail_status)
        chat = request.url.path.endswith("chat/completions")
        if not payload.get("stream"):
            text = "".join(f" t{i}" for i in range(state.chunks))
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choice = {"index": 0, **choice, "finish_reason": "stop"}
            return JSONResponse({"id": "x", "system_fingerprint": state.name, "choices": [choice]})

        async def stream() -> AsyncIterator[bytes]:
            state.running += 1
            finished = False
            try:
                for index in range(state.chunks):
                    if state.chunk_delay_s:
                        await asyncio.sleep(state.chunk_delay_s)
                    yield _chunk(state, index, chat)
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                state.running -= 1
                state.abandoned_streams += not finished

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def metrics(request: Request) -> Response:
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f'vllm:num_requests_running{{model_name="fake"}} {state.running}',
            "# TYPE vllm:num_requests_waiting gauge",
            'vllm:num_requests_waiting{model_name="fake"} 0',
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/health", health),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-delay-s", type=float, default=0.0)
    args = parser.parse_args()
    state = FakeEngineState(args.name, args.chunks, args.chunk_delay_s)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
