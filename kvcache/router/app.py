"""The router's HTTP face: an OpenAI-compatible proxy in front of the engines.

`/v1/completions` and `/v1/chat/completions` go to the engine the policy ranks first; the body is
forwarded as received (bytes, never re-serialized) through one pooled aiohttp session, and a
streamed answer is relayed chunk by chunk as the engine writes it. If the engine cannot be reached
or answers 5xx before any byte reached the client, the next engine in the ranking gets the request.
A client that goes away mid-stream closes the upstream connection, which makes vLLM abort the
request instead of generating for no one. A request is ranked only among the engines that serve
its `model` (their `/v1/models`, adapters included), and `/v1/models` lists what they all serve.
Errors are OpenAI-shaped and never name an engine's pod or address (those go to the log).
`/healthz` is ready while one engine is, `/livez` while the process serves; `/metrics` is
Prometheus text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kvcache.router.engines import Engine, EnginePool, watching

log = logging.getLogger(__name__)

# hop-by-hop headers (RFC 9110 §7.6.1) and those the server recomputes
_DROP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "te",
                 "upgrade", "proxy-connection", "content-encoding"}  # fmt: skip


class Decision(Protocol):
    ranking: list[Engine]  # healthy engines, best first


class Policy(Protocol):
    async def run(self) -> None:
        """Background work while the app runs (following the engines' KV events)."""
        ...

    async def rank(self, path: str, payload: dict[str, Any], engines: list[Engine]) -> Decision: ...

    def routed(self, decision: Decision, engine: Engine) -> None:
        """The request went to `engine` (its prefix is expected there from now on)."""
        ...

    def first_byte(self, decision: Decision, engine: Engine) -> None:
        """`engine` started answering the request: its prefill is done."""
        ...

    def engine_down(self, engine: Engine) -> None:
        """`engine` left the rotation: what was known of its cache may be gone."""
        ...

    def metrics(self) -> Iterable[Metric]:
        """What the policy counts and checks, for /metrics."""
        ...


@dataclass(frozen=True)
class ProxySettings:
    max_attempts: int = 3
    connect_timeout_s: float = 2.0
    max_connections: int = 4096
    max_body_bytes: int = 32 << 20  # a request body past this is refused (413), never buffered
    # An engine that takes longer to start answering (headers, then the first body chunk),
    # or stalls longer between chunks, is given up on: a hung engine must not hold requests
    # (and the router's connections) for ever. The first covers a long queue and prefill.
    first_byte_timeout_s: float = 600.0
    idle_timeout_s: float = 120.0


class _PolicyMetrics(Collector):
    def __init__(self, policy: Policy) -> None:
        self._policy = policy

    def collect(self) -> Iterable[Metric]:
        return self._policy.metrics()


class _Metrics:
    def __init__(self, policy: Policy) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_PolicyMetrics(policy))
        self.requests = Counter(
            "kvcache_router_requests", "requests by engine and outcome",
            ["engine", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.retries = Counter(
            "kvcache_router_retries", "requests re-sent to the next engine", registry=self.registry
        )
        self.decision = Histogram(
            "kvcache_router_decision_seconds", "time to rank the engines for a request",
            buckets=(5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2), registry=self.registry,
        )  # fmt: skip


def openai_error(status: int, message: str, kind: str) -> JSONResponse:
    """An error as vLLM and OpenAI shape it, so clients' error handling works the same."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status)


def _outcome(status: int) -> str:
    return "ok" if status < 400 else str(status)


def _forward_headers(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROP_HEADERS}


class _RelayResponse(StreamingResponse):
    """A relayed stream that stops when the client leaves. Starlette's StreamingResponse watches
    for the departure with an anyio task group per response (ASGI 2.3 servers, uvicorn included,
    drop writes to a gone client silently); one plain asyncio task does the same for less CPU."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        relaying = asyncio.current_task()
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            relaying.cancel()

        # cancelled before it runs again once the last chunk is sent: uvicorn answers `receive`
        # with a disconnect as soon as the response is complete
        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not left:
                raise
            relaying.uncancel()
        finally:
            watcher.cancel()
            await self.body_iterator.aclose()  # a relay left at a `yield` closes its upstream


def create_app(
    pool: EnginePool,
    policy: Policy,
    settings: ProxySettings | None = None,
    background: Sequence[Callable[[], Awaitable[None]]] = (),
) -> FastAPI:
    """`background`: more work to run while the app serves (engine discovery)."""
    settings = settings or ProxySettings()
    metrics = _Metrics(policy)
    state: dict[str, aiohttp.ClientSession] = {}
    pool.on_down = policy.engine_down

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=settings.max_connections, limit_per_host=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout_s)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            state["session"] = session
            tasks = [asyncio.create_task(work()) for work in (policy.run, *background)]
            try:
                async with watching(pool, session):
                    yield
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    app = FastAPI(title="kvcache router", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.pool, app.state.policy = pool, policy  # what the router knows, for inspection

    async def proxy(request: Request, path: str) -> Response:
        body = await _body(request, settings.max_body_bytes)
        if body is None:
            return openai_error(
                413, f"the request body is over {settings.max_body_bytes} bytes", "BadRequestError"
            )
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as error:
            return openai_error(400, f"bad request body: {error}", "BadRequestError")
        healthy = pool.healthy()
        if not healthy:
            return openai_error(503, "no healthy engine", "ServiceUnavailableError")
        model = payload.get("model")
        serving = [engine for engine in healthy if engine.serves(model)]
        if not serving:
            return openai_error(404, f"The model `{model}` does not exist.", "NotFoundError")
        started = time.perf_counter()
        decision = await policy.rank(path, payload, serving)
        metrics.decision.observe(time.perf_counter() - started)
        ranking = decision.ranking
        headers = _forward_headers(request.headers)
        session = state["session"]

        def given_up(engine: Engine, outcome: str) -> None:
            """The request will not be relayed from `engine`: its counts go back."""
            engine.in_flight -= 1
            engine.awaiting_first_token -= 1
            metrics.requests.labels(engine.name, outcome).inc()

        for attempt, engine in enumerate(ranking[: settings.max_attempts]):
            if attempt:
                metrics.retries.inc()
            engine.in_flight += 1
            engine.awaiting_first_token += 1
            try:
                upstream = await _post_while_client_waits(
                    request,
                    session.post(
                        f"{engine.url}{path}", data=body, headers=headers | engine.headers
                    ),
                    settings.first_byte_timeout_s,
                )
            except ClientLeft:
                given_up(engine, "client_left")
                return Response(status_code=499)  # nobody reads it
            except (TimeoutError, aiohttp.ClientError) as error:
                given_up(engine, "unreachable")
                pool.mark_failed(engine)
                log.warning("engine %s (%s) unreachable: %s", engine.name, engine.url, error)
                continue
            if upstream.status >= 500 and attempt + 1 < min(len(ranking), settings.max_attempts):
                upstream.release()
                given_up(engine, str(upstream.status))
                log.warning("engine %s answered %d; trying the next", engine.name, upstream.status)
                continue
            policy.routed(decision, engine)
            metrics.requests.labels(engine.name, _outcome(upstream.status)).inc()
            return _RelayResponse(
                _relay(
                    upstream,
                    engine,
                    functools.partial(policy.first_byte, decision, engine),
                    settings,
                ),
                status_code=upstream.status,
                headers=_forward_headers(upstream.headers),
            )
        return openai_error(502, "no engine could take the request", "BadGatewayError")

    # Plain Starlette routes: FastAPI's dependency resolution runs for every request and gives a
    # proxy nothing (it takes the body as bytes).
    async def completions(request: Request) -> Response:
        return await proxy(request, "/v1/completions")

    async def chat_completions(request: Request) -> Response:
        return await proxy(request, "/v1/chat/completions")

    app.add_route("/v1/completions", completions, methods=["POST"])
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])

    @app.get("/v1/models")
    async def models() -> Response:
        cards: dict[str, dict[str, Any]] = {}
        for engine in pool.healthy():
            for card in engine.model_cards:
                cards.setdefault(card["id"], card)
        if cards:
            return JSONResponse({"object": "list", "data": list(cards.values())})
        for engine in pool.healthy():  # no scrape has listed them yet
            try:
                async with state["session"].get(f"{engine.url}/v1/models") as upstream:
                    return Response(await upstream.read(), upstream.status,
                                    media_type=upstream.content_type)  # fmt: skip
            except (TimeoutError, aiohttp.ClientError):
                pool.mark_failed(engine)
        return openai_error(503, "no healthy engine", "ServiceUnavailableError")

    @app.get("/livez")
    async def livez() -> Response:
        """The process serves: Kubernetes' liveness probe. Not /healthz, which fails while no
        engine is up: a liveness probe on it would restart every router replica (and drop what
        their indexes hold) whenever the engines are all down or not yet started."""
        return JSONResponse({"live": True})

    @app.get("/healthz")
    async def healthz() -> Response:
        healthy = len(pool.healthy())
        keyed = sum(engine.keys is not None for engine in pool.engines.values())
        # keyed: engines whose connector said how it keys chunks (the cluster is asked for them)
        body = {"healthy_engines": healthy, "engines": len(pool.engines), "keyed_engines": keyed}
        return JSONResponse(body, 200 if healthy else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class ClientLeft(Exception):
    """The client went away before the engine answered."""


async def _body(request: Request, limit: int) -> bytes | None:
    """The request's body, or None past `limit` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
    return b"".join(parts)


async def _post_while_client_waits(
    request: Request, posting: Awaitable[aiohttp.ClientResponse], timeout_s: float
) -> aiohttp.ClientResponse:
    """The engine's response head, unless the client leaves first: then the post is cancelled,
    which drops the connection and makes vLLM abort the request (a non-streamed answer sends
    nothing until it is complete, so the relay's watch would come too late). TimeoutError past
    `timeout_s`."""

    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer = asyncio.ensure_future(posting)
    leaving = asyncio.ensure_future(client_left())
    try:
        done, _ = await asyncio.wait(
            {answer, leaving}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        leaving.cancel()
    if answer in done:
        return answer.result()
    answer.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
        await answer
    if leaving in done:
        raise ClientLeft
    raise TimeoutError(f"no answer within {timeout_s} s")


async def _relay(
    upstream: aiohttp.ClientResponse,
    engine: Engine,
    on_first_byte: Callable[[], None],
    settings: ProxySettings,
) -> AsyncIterator[bytes]:
    """The engine's body as it arrives; if the client leaves, Starlette cancels this generator
    and closing (not releasing) the response drops the connection, so the engine aborts. An
    engine that sends no first chunk within the first-byte timeout, or stalls past the idle
    timeout, is dropped the same way (the client sees the answer end short)."""
    first, finished = True, False
    try:
        while True:
            timeout = settings.first_byte_timeout_s if first else settings.idle_timeout_s
            try:
                async with asyncio.timeout(timeout):  # a timer handle, not a task per chunk
                    chunk = await upstream.content.readany()
            except TimeoutError:
                log.warning("engine %s sent nothing for %.0f s; dropping it", engine.name, timeout)
                return
            if not chunk:
                break
            if first:
                engine.awaiting_first_token -= 1
                first = False
                on_first_byte()
            yield chunk
        finished = True
    finally:
        engine.in_flight -= 1
        if first:
            engine.awaiting_first_token -= 1
        if finished:
            upstream.release()
        else:
            upstream.close()
