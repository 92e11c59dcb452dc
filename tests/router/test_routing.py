"""The router (real uvicorn, built as `kvcache router` builds it) in front of fake engines that
announce their prefix caches as vLLM does: KV events over real ZeroMQ sockets, in vLLM's wire
format, with its replay endpoint. Prompts are token ids, which the router hashes as vLLM would.
A prefix goes where the events show it, also when the router never routed it itself and after a
router restart; a saturated engine sheds requests for its own prefix; eight prompt groups spread
over four idle engines and each keeps its engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import zmq
from fastapi import FastAPI
from http_servers import ServerThread, serving, wait_for

from kvcache.router.block_hash import block_hashes
from kvcache.router.engines import HealthSettings
from kvcache.router.kv_events import BlockStored, EventBatch, decode_frame
from kvcache.router.policy import EngineEvents, PolicySettings
from kvcache.router.score import (
    EngineState,
    RouteRequest,
    ScoreSettings,
    affinity_block,
    rank_engines,
)
from kvcache.router.serve import RouterSettings, build_app
from kvcache.testing.fake_engine import FakeEngineState
from kvcache.testing.fake_engine import create_app as fake_engine
from kvcache.testing.fake_kv_events import FakeKVEvents

BLOCK = 16
VOCAB = 49_152
# Past the policy's minimum match whatever its default: a shorter match counts as none.
PREFIX_TOKENS = BLOCK * (-(-ScoreSettings().min_match_tokens // BLOCK) + 2)


def fake_engines(count: int) -> list[FakeEngineState]:
    """Engines publishing on ports of the OS's choosing (their endpoints once they serve)."""
    return [
        FakeEngineState(f"e{i}", kv_events=FakeKVEvents(block_size=BLOCK)) for i in range(count)
    ]


@dataclass
class Router:
    app: FastAPI
    server: ServerThread
    applied: dict[str, int]  # engine -> seq of the last KV-event batch the router applied

    def send(self, prompt: list[int], client: httpx.Client) -> str:
        """Where the router sent a completion of `prompt` (token ids)."""
        answer = client.post(
            f"{self.server.url}/v1/completions", json={"model": "fake", "prompt": prompt}
        )
        assert answer.status_code == 200, answer.text
        return answer.json()["system_fingerprint"]

    def caught_up(self, states: list[FakeEngineState]) -> None:
        """Wait until the router applied every batch the engines published."""
        wait_for(
            lambda: all(self.applied.get(s.name, -1) >= s.kv_events.published - 1 for s in states),
            10,
            "the router to apply the engines' KV events",
        )


@contextlib.contextmanager
def router(
    states: list[FakeEngineState], urls: list[str], speculative_ttl_s: float = 5.0
) -> Iterator[Router]:
    settings = RouterSettings(
        engines={s.name: url for s, url in zip(states, urls)},
        events={
            s.name: EngineEvents(s.kv_events.endpoint, s.kv_events.replay_endpoint) for s in states
        },
        policy=PolicySettings(block_size=BLOCK, speculative_ttl_s=speculative_ttl_s),
        health=HealthSettings(interval_s=0.1, timeout_s=5.0),  # lenient on a busy machine
    )
    app = build_app(settings)
    applied: dict[str, int] = {}
    index = app.state.policy.index
    apply = index.apply

    def recording(engine: str, batch: EventBatch) -> None:  # read by the subscribers at start
        apply(engine, batch)
        applied[engine] = batch.seq

    index.apply = recording
    subscribed = sum(s.kv_events.subscriptions for s in states)
    with serving(app) as (server,):
        wait_for(
            lambda: sum(s.kv_events.subscriptions for s in states) == subscribed + len(states),
            10,
            "the router to subscribe to every engine",
        )
        yield Router(app, server, applied)


@contextlib.contextmanager
def fleet(count: int, **router_options) -> Iterator[tuple[list[FakeEngineState], Router]]:
    states = fake_engines(count)
    with serving(*(fake_engine(s) for s in states)) as engines:
        with router(states, [e.url for e in engines], **router_options) as front:
            yield states, front


@pytest.fixture
def tokens():
    rng = random.Random(13)

    def draw(count: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(count)]

    return draw


def test_the_fake_engine_publishes_vllms_own_frames(tokens):
    kv_events = pytest.importorskip("vllm.distributed.kv_events")
    import msgspec

    (state,) = fake_engines(1)
    shared, first_tail, second_tail = tokens(3 * BLOCK), tokens(5), tokens(BLOCK + 1)
    with serving(fake_engine(state)) as (engine,):
        sub = zmq.Context.instance().socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(state.kv_events.endpoint)
            wait_for(lambda: state.kv_events.subscriptions == 1, 10, "the subscription")
            for prompt in (shared + first_tail, shared + second_tail):
                httpx.post(f"{engine.url}/v1/completions", json={"prompt": prompt})
            frames = [sub.recv_multipart(), sub.recv_multipart()]
        finally:
            sub.close(linger=0)
    hashes = block_hashes(shared + second_tail, BLOCK, "0")
    # the second prompt's shared blocks were cached: it announces only its new block
    expected = [(hashes[:3], None, shared), (hashes[3:], hashes[2], second_tail[:BLOCK])]
    for seq, (frame, (stored, parent, token_ids)) in enumerate(zip(frames, expected)):
        batch = decode_frame(frame)
        assert frame[:2] == [b"", seq.to_bytes(8, "big")]
        assert batch.events == (BlockStored(tuple(stored), parent, tuple(token_ids), BLOCK,
                                            medium="GPU"),)  # fmt: skip
        # byte for byte what vLLM's publisher sends for the same batch
        vllm_event = kv_events.BlockStored(
            block_hashes=stored, parent_block_hash=parent, token_ids=token_ids,
            block_size=BLOCK, lora_id=None, medium="GPU", lora_name=None,
        )  # fmt: skip
        vllm_batch = kv_events.KVEventBatch(ts=batch.ts, events=[vllm_event], data_parallel_rank=0)
        assert frame[2] == msgspec.msgpack.encode(vllm_batch)


def unaware_ranking(prompt: list[int], states: list[FakeEngineState]) -> list[FakeEngineState]:
    """The router's ranking of idle engines for `prompt` while its index is empty: they tie, and
    its rendezvous hash of the prompt's affinity block orders them."""
    settings = ScoreSettings()  # the router's, as built here
    hashes = block_hashes(prompt, BLOCK, "0")
    request = RouteRequest(len(prompt), affinity_block(hashes, BLOCK, settings))
    ranking = rank_engines(request, [EngineState(s.name) for s in states], settings)
    by_name = {s.name: s for s in states}
    return [by_name[candidate.name] for candidate in ranking]


def test_a_prefix_goes_to_the_engine_whose_events_show_it(tokens):
    with fleet(3, speculative_ttl_s=0.2) as (states, front), httpx.Client() as client:
        # A prefix the router never routed (another replica's request) is cached on the engine
        # it would rank last on its own: only that engine's events can steer the request there.
        prefix = tokens(PREFIX_TOKENS)
        holder = unaware_ranking(prefix, states)[-1]
        client.post(f"{engine_url(front, holder)}/v1/completions", json={"prompt": prefix})
        front.caught_up(states)
        assert front.send(prefix + tokens(7), client) == holder.name
        # A prefix the router routes itself, one it would send to the holder on its own: the
        # holder's larger index loses the tie, the prefix goes elsewhere, and that engine's
        # events keep it there after the router's speculative entries expired.
        prefix = tokens(PREFIX_TOKENS)
        while unaware_ranking(prefix, states)[0] is not holder:
            prefix = tokens(PREFIX_TOKENS)
        first = front.send(prefix + tokens(3), client)
        assert first != holder.name
        front.caught_up(states)
        time.sleep(0.3)
        assert front.send(prefix + tokens(9), client) == first


def engine_url(front: Router, state: FakeEngineState) -> str:
    return front.app.state.pool.engines[state.name].url


def test_a_restarted_router_rebuilds_its_index_from_the_engines_replay(tokens):
    with fleet(3) as (states, first_router), httpx.Client() as client:
        prefixes = {}
        for state in states:
            prefixes[state.name] = tokens(PREFIX_TOKENS)
            url = engine_url(first_router, state)
            client.post(f"{url}/v1/completions", json={"prompt": prefixes[state.name]})
        urls = [engine_url(first_router, state) for state in states]
        # A second replica (or the same router after a restart) sees none of those live.
        with router(states, urls) as second_router:
            second_router.caught_up(states)
            for name, prefix in prefixes.items():
                assert second_router.send(prefix + tokens(11), client) == name


def test_a_saturated_engine_sheds_requests_for_its_prefix(tokens):
    with fleet(3) as (states, front), httpx.Client() as client:
        prefix = tokens(PREFIX_TOKENS)
        holder = unaware_ranking(prefix, states)[-1]  # only its events can draw the prefix
        client.post(f"{engine_url(front, holder)}/v1/completions", json={"prompt": prefix})
        front.caught_up(states)
        assert front.send(prefix + tokens(5), client) == holder.name
        # vLLM's gauges say the holder is swamped (by other routers' requests, say)
        holder.waiting = 200
        engine = front.app.state.pool.engines[holder.name]
        wait_for(lambda: engine.waiting == 200, 10, "the router to scrape the holder's load")
        sent = [front.send(prefix + tokens(5), client) for _ in range(6)]
        assert holder.name not in sent
        # the prefix moved as a whole: the first engine to take it holds it from then on
        assert len(set(sent)) == 1


def test_the_routers_own_open_streams_spread_a_hot_prefix(tokens):
    with fleet(3) as (states, front), httpx.Client() as client:
        prefix = tokens(PREFIX_TOKENS)
        holder = unaware_ranking(prefix, states)[-1]  # only its events can draw the prefix
        holder.chunks, holder.chunk_delay_s = 1000, 0.02  # streams that last
        client.post(f"{engine_url(front, holder)}/v1/completions", json={"prompt": prefix})
        front.caught_up(states)
        sent = asyncio.run(open_streams_until_one_leaves(front, holder, prefix, tokens))
        # the first ones stay with the prefix; once the holder carries many more than the
        # idle engines, the next goes elsewhere (before any scrape could show it)
        assert sent[0] == holder.name and sent[-1] != holder.name, sent
        assert sent.count(holder.name) == len(sent) - 1 >= 2
        wait_for(lambda: holder.running == 0, 10, "the abandoned streams to end")


async def open_streams_until_one_leaves(
    front: Router, holder: FakeEngineState, prefix: list[int], tokens
) -> list[str]:
    """Open streams of `prefix` one at a time, each held open after its first chunk, until the
    router sends one to another engine (64 at most); where each went."""
    sent: list[str] = []
    held = []
    async with httpx.AsyncClient() as client, contextlib.AsyncExitStack() as streams:
        while len(sent) < 64 and sent[-1:] in ([], [holder.name]):
            body = {"prompt": prefix + tokens(5), "stream": True}
            stream = await streams.enter_async_context(
                client.stream("POST", f"{front.server.url}/v1/completions", json=body)
            )
            lines = stream.aiter_lines()
            held.append(lines)  # a line iterator left behind would close its stream
            line = await anext(lines)
            sent.append(json.loads(line.removeprefix("data: "))["system_fingerprint"])
    return sent


def test_eight_prompt_groups_spread_over_four_idle_engines_and_keep_their_engine(tokens):
    with fleet(4) as (states, front), httpx.Client() as client:
        groups = [tokens(PREFIX_TOKENS) for _ in range(8)]
        where: dict[int, set[str]] = {g: set() for g in range(len(groups))}
        for _ in range(3):
            for group, prefix in enumerate(groups):
                where[group].add(front.send(prefix + tokens(20), client))
        assert all(len(engines) == 1 for engines in where.values()), where
        assert set().union(*where.values()) == {s.name for s in states}
