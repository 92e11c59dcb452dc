"""An instant OpenAI-compatible engine for the router's tests and benchmarks: real HTTP, no model.

It answers `/v1/completions` and `/v1/chat/completions` (JSON, or SSE with one write per chunk),
`/v1/models`, `/health`, vLLM's load gauges on `/metrics`, and what peer routers ask of an engine
(`tokenizer_routes`); it names itself in every answer's `system_fingerprint` so a test sees where
the router sent a request, and counts the streams a client abandoned (the router must close them).
`fail_status` makes it answer that status, `waiting` report that many waiting requests; with
`kv_events` it announces the blocks of token-id prompts as vLLM would (`fake_kv_events`).

    python -m kvcache.testing.fake_engine --port 8001 --name e1 [--chunks 8 --chunk-delay-s 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from kvcache.core.keys import EngineKeySettings
from kvcache.router.tokenize import prompt_token_ids
from kvcache.testing.fake_kv_events import FakeKVEvents

PSEUDO_VOCAB = 49_152  # SmolLM2's vocabulary size
PSEUDO_MAX_MODEL_LEN = 8192
_render_ids = itertools.count()


@dataclass
class FakeEngineState:
    name: str
    chunks: int = 4
    chunk_delay_s: float = 0.0
    fail_status: int = 0
    running: int = 0
    waiting: int = 0  # reported as vllm:num_requests_waiting (a test saturates the engine so)
    requests: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each generate request
    abandoned_streams: int = 0
    model_path: str = ""  # reported on /model_info (a local tokenizer directory)
    kv_events: FakeKVEvents | None = None  # publish vLLM KV events for token-id prompts
    models: tuple[str, ...] = ("fake",)  # served names on /v1/models
    adapters: tuple[str, ...] = ()  # LoRA adapters on /v1/models (their parent: models[0])
    key_settings: EngineKeySettings | None = None  # published as a kvcache connector does
    answer_delay_s: float = 0.0  # a non-streamed answer's time to compute (a long prefill)
    first_chunk_delay_s: float = 0.0  # a stream's wait before its first chunk
    cancelled: int = 0  # non-streamed requests abandoned by their client, and so aborted


def _chunk(state: FakeEngineState, index: int, chat: bool) -> bytes:
    delta = {"delta": {"content": f" t{index}"}} if chat else {"text": f" t{index}"}
    body = {"id": "x", "object": "chunk", "system_fingerprint": state.name,
            "choices": [{"index": 0, **delta, "finish_reason": None}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def pseudo_token_ids(text: str) -> list[int]:
    """A stand-in tokenization for routers that ask the engine for a prompt's tokens: one id per
    4 bytes of UTF-8, so prompts that share a prefix share their leading ids, at almost no cost."""
    data = text.encode()
    data += b"\0" * (-len(data) % 4)
    return [value % PSEUDO_VOCAB for value in memoryview(data).cast("I")]


def _chat_text(messages: object) -> str:
    """The conversation as a ChatML-style template would render it, with the generation prompt."""
    parts = []
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict):
            parts.append(f"<|im_start|>{message.get('role', '')}\n{message.get('content', '')}")
            parts.append("<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"


def _prompt_text(payload: dict) -> str:
    if "messages" in payload:
        return _chat_text(payload["messages"])
    prompt = payload.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


def tokenizer_routes(state: FakeEngineState) -> list[Route]:
    """What peer routers call besides generation: vLLM's `/tokenize` and
    `/v1/chat/completions/render` (vllm-router's cache_aware asks them for every request), and
    SGLang's `/server_info` and `/model_info` (sglang-router reads the model's name and tokenizer
    path there at start; given `model_path`). The answers have vLLM's and SGLang's field names;
    the token ids are `pseudo_token_ids`."""

    async def tokenize(request: Request) -> Response:
        ids = pseudo_token_ids(_prompt_text(await request.json()))
        return JSONResponse(
            {"count": len(ids), "max_model_len": PSEUDO_MAX_MODEL_LEN, "tokens": ids,
             "token_strs": None}
        )  # fmt: skip

    async def render(request: Request) -> Response:
        payload = await request.json()
        ids = pseudo_token_ids(_prompt_text(payload))
        sampling = {"max_tokens": payload.get("max_tokens"),
                    "temperature": payload.get("temperature", 1.0)}  # fmt: skip
        generate = {"request_id": f"render-{state.name}-{next(_render_ids)}", "token_ids": ids,
                    "sampling_params": sampling, "model": payload.get("model"),
                    "stream": bool(payload.get("stream"))}  # fmt: skip
        return JSONResponse(generate if "messages" in payload else [generate])

    async def model_info(request: Request) -> Response:
        # sglang-router names the model and loads its tokenizer from /server_info's answer
        if not state.model_path:
            return JSONResponse({"error": {"message": "no model path given"}}, 404)
        return JSONResponse({"model_path": state.model_path, "tokenizer_path": state.model_path,
                             "served_model_name": "fake", "is_generation": True,
                             "max_context_length": PSEUDO_MAX_MODEL_LEN})  # fmt: skip

    return [
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/chat/completions/render", render, methods=["POST"]),
        Route("/v1/completions/render", render, methods=["POST"]),
        Route("/model_info", model_info),
        Route("/server_info", model_info),
    ]


async def _client_left_within(request: Request, seconds: float) -> bool:
    async def left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(left(), seconds)
    except TimeoutError:
        return False
    return True


def create_app(state: FakeEngineState) -> Starlette:
    async def generate(request: Request) -> Response:
        payload = await request.json()
        state.requests.append(payload)
        state.headers.append(dict(request.headers))
        if state.fail_status:
            return JSONResponse({"error": {"message": "failing on purpose"}}, state.fail_status)
        chat = request.url.path.endswith("chat/completions")
        token_ids = prompt_token_ids(request.url.path, payload)
        if state.kv_events is not None and token_ids is not None:
            await state.kv_events.serve_prompt(token_ids)
        if not payload.get("stream"):
            if state.answer_delay_s and await _client_left_within(request, state.answer_delay_s):
                state.cancelled += 1  # as vLLM's `with_cancellation` aborts the request
                return Response(status_code=499)
            text = "".join(f" t{i}" for i in range(state.chunks))
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            choice = {"index": 0, **choice, "finish_reason": "stop"}
            return JSONResponse({"id": "x", "system_fingerprint": state.name, "choices": [choice]})

        async def stream() -> AsyncIterator[bytes]:
            state.running += 1
            finished = False
            try:
                if state.first_chunk_delay_s:
                    await asyncio.sleep(state.first_chunk_delay_s)
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
            f'vllm:num_requests_waiting{{model_name="fake"}} {state.waiting}',
        ]
        if state.key_settings is not None:
            labels = {"model_name": "fake", "engine": "0", **state.key_settings.published()}
            text = ",".join(f'{name}="{value}"' for name, value in labels.items())
            lines += ["# TYPE kvcache:chunk_namespace_info gauge",
                      f"kvcache:chunk_namespace_info{{{text}}} 1.0"]  # fmt: skip
        return PlainTextResponse("\n".join(lines) + "\n")

    async def models(request: Request) -> Response:
        cards = [{"id": name, "object": "model", "root": name, "parent": None}
                 for name in state.models]  # fmt: skip
        cards += [{"id": name, "object": "model", "root": f"/adapters/{name}",
                   "parent": state.models[0]} for name in state.adapters]  # fmt: skip
        return JSONResponse({"object": "list", "data": cards})

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with state.kv_events.publishing() if state.kv_events else contextlib.nullcontext():
            yield

    return Starlette(
        routes=[
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/metrics", metrics),
            Route("/v1/models", models),
            Route("/health", health),
            *tokenizer_routes(state),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-delay-s", type=float, default=0.0)
    parser.add_argument("--model-path", default="", help="reported on /model_info")
    # vLLM's flags (those an operator adds when the engine joins) are ignored: it stands in for
    # vLLM in the e2e tests
    args, _ = parser.parse_known_args()
    state = FakeEngineState(args.name, args.chunks, args.chunk_delay_s, model_path=args.model_path)
    uvicorn.run(create_app(state), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
