"""The live policy's own decisions, on plain values: what it hashes a request into, and what it
forgets when an engine leaves the rotation."""

from __future__ import annotations

import asyncio
import random

from kvcache.router.block_hash import block_hashes
from kvcache.router.engines import Engine
from kvcache.router.kv_events import BlockStored, EventBatch
from kvcache.router.policy import EngineEvents, PolicySettings, PrefixPolicy

BLOCK = 16


def test_prompts_sent_as_token_ids_are_hashed_as_vllm_hashes_them_without_a_tokenizer():
    ids = [random.Random(1).randrange(50_000) for _ in range(5 * BLOCK + 3)]
    policy = PrefixPolicy(PolicySettings(block_size=BLOCK))
    engines = [Engine("a", "http://a"), Engine("b", "http://b")]
    for prompt in (ids, [ids]):  # one prompt, or a batch of one
        decision = asyncio.run(policy.rank("/v1/completions", {"prompt": prompt}, engines))
        assert decision.block_hashes == block_hashes(ids, BLOCK, "0")


def test_only_an_engine_without_kv_events_is_forgotten_when_it_leaves_the_rotation():
    # an engine with events: a restart shows in them (its seqs start over); a busy engine that
    # missed two scrapes would otherwise lose prefixes vLLM never announces again
    policy = PrefixPolicy(
        PolicySettings(block_size=BLOCK), events={"with-events": EngineEvents("tcp://a:1")}
    )
    hashes = block_hashes(list(range(2 * BLOCK)), BLOCK, "0")
    stored = BlockStored(tuple(hashes), None, tuple(range(2 * BLOCK)), BLOCK)
    policy.index.apply("with-events", EventBatch(0, 0.0, (stored,)))
    policy.index.add_speculative("history-only", hashes, ttl_s=300)
    for name in ("with-events", "history-only"):
        policy.engine_down(Engine(name, f"http://{name}"))
    assert policy.index.match(hashes) == {"with-events": 2}
