"""The live policy's own decisions: what it hashes a request into, what it forgets when an engine
leaves the rotation, and what the cache cluster (real node processes) adds to the choice."""

from __future__ import annotations

import asyncio
import random
import time

import zmq

from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig, CurveClientKeys
from kvcache.core.keys import EngineKeySettings, chunk_keys
from kvcache.core.ring import Member
from kvcache.router.block_hash import block_hashes
from kvcache.router.engines import Engine
from kvcache.router.kv_events import BlockStored, EventBatch
from kvcache.router.policy import (
    ChunkLookup,
    ClusterLookup,
    EngineEvents,
    PolicySettings,
    PrefixPolicy,
)
from kvcache.router.serve import ClusterSettings

BLOCK = 16
KEYS = EngineKeySettings(model="m", kv_dtype="bfloat16")  # what an engine's connector publishes
LOOKUP = ChunkLookup(KEYS.namespace(), KEYS.chunk_tokens)


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


def test_a_prefix_the_cluster_holds_lets_an_idle_engine_win_over_a_busy_gpu_hit(start_cluster):
    """Engine a holds the prompt on its GPU but has requests queued; engine b holds nothing. Alone,
    a's GPU hit wins; once the cache cluster holds the prefix, b can load it for a fraction of a
    prefill and wins. A dead cluster counts as holding nothing, without stalling."""
    cluster = start_cluster(2)
    ids = [random.Random(2).randrange(50_000) for _ in range(2048 + 10)]
    namespace = KEYS.namespace()

    def lookup(members) -> ClusterLookup:
        config = ClientConfig(timeout_s=0.2)
        return ClusterLookup(lambda: ClusterClient(members, config), budget_s=1.0)

    def first_choice(policy: PrefixPolicy) -> str:
        busy = Engine("a", "http://a", awaiting_first_token=3, keys=KEYS)
        idle = Engine("b", "http://b", keys=KEYS)
        policy.index.add_speculative("a", block_hashes(ids, BLOCK, "0"), ttl_s=300)
        decision = asyncio.run(policy.rank("/v1/completions", {"prompt": ids}, [busy, idle]))
        return decision.ranking[0].name

    warm, dead = lookup(cluster.members), lookup([Member("gone", "tcp://127.0.0.1:9")])
    try:
        assert first_choice(PrefixPolicy(PolicySettings(block_size=BLOCK), cluster=warm)) == "a"
        keys = chunk_keys(ids, namespace, 256)
        with ClusterClient(cluster.members) as client:
            assert all(client.put(keys, [b"kv"] * len(keys)))
        assert asyncio.run(warm.tokens(ids[:-1], [LOOKUP])) == [2048]
        assert first_choice(PrefixPolicy(PolicySettings(block_size=BLOCK), cluster=warm)) == "b"
        started = time.monotonic()
        assert asyncio.run(dead.tokens(ids, [LOOKUP])) == [0]
        assert time.monotonic() - started < 1.0
    finally:
        warm.close()
        dead.close()


def test_engines_that_discovery_drops_leave_the_index():
    policy = PrefixPolicy(PolicySettings(block_size=BLOCK))
    hashes = block_hashes(list(range(2 * BLOCK)), BLOCK, "0")
    policy.set_engines({"ml/a": None, "ml/b": EngineEvents("tcp://10.0.0.2:5557")})
    for name in ("ml/a", "ml/b"):
        policy.index.add_speculative(name, hashes, ttl_s=300)
    policy.set_engines({"ml/a": None})
    assert policy.index.match(hashes) == {"ml/a": 2}


def test_a_long_prefill_restarts_the_speculative_entries_clock_and_a_short_one_does_not():
    ids = list(range(4 * BLOCK))
    settings = PolicySettings(block_size=BLOCK, speculative_ttl_s=0.4)
    engines = [Engine("a", "http://a")]

    def matched_after(wait_before_first_byte_s: float) -> dict[str, int]:
        policy = PrefixPolicy(settings, events={"a": EngineEvents("tcp://a:1")})
        decision = asyncio.run(policy.rank("/v1/completions", {"prompt": ids}, engines))
        policy.routed(decision, engines[0])
        time.sleep(wait_before_first_byte_s)
        policy.first_byte(decision, engines[0])
        time.sleep(0.45 - wait_before_first_byte_s)  # past the TTL counted from routing
        return policy.index.match(decision.block_hashes)

    assert matched_after(0.15) == {"a": 4}  # queued past a quarter of the TTL: refreshed
    assert matched_after(0.0) == {}  # answered at once: left to expire (no event came)


def test_a_cluster_that_stops_answering_delays_no_request_past_the_lookup_budget():
    """A node that takes requests and never answers (a hung process) holds the lookup thread for
    the client's whole timeout; requests are routed without the cluster after the budget, and
    the ones queued behind are dropped rather than run late."""
    silent = zmq.Context.instance().socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    member = Member("silent", f"tcp://127.0.0.1:{port}")
    config = ClientConfig(timeout_s=2.0)
    lookup = ClusterLookup(lambda: ClusterClient([member], config), budget_s=0.05)
    ids = list(range(1024))

    async def burst() -> list[list[int]]:
        return await asyncio.gather(*(lookup.tokens(ids, [LOOKUP]) for _ in range(20)))

    try:
        started = time.monotonic()
        assert asyncio.run(burst()) == [[0]] * 20
        assert time.monotonic() - started < 0.5  # not 2 s, nor 20 x 2 s
    finally:
        lookup.close()
        silent.close(linger=0)


def test_the_router_reads_a_curvezmq_cluster_with_its_keys(start_node):
    server_public, server_secret = zmq.curve_keypair()
    client = CurveClientKeys(server_public, *zmq.curve_keypair())
    node_env = {
        "KVCACHE_CURVE_PUBLIC_KEY": server_public.decode(),
        "KVCACHE_CURVE_SECRET_KEY": server_secret.decode(),
        "KVCACHE_CURVE_ALLOWED_CLIENTS": client.public_key.decode(),
    }
    node = start_node(env=node_env)
    ids = list(range(512 + 1))
    keys = chunk_keys(ids, KEYS.namespace(), 256)
    config = ClientConfig(curve=client)
    with ClusterClient([node.member], config) as writer:
        assert writer.put(keys, [b"kv"] * len(keys)) == [True, True]

    def held(curve: CurveClientKeys | None) -> int:
        settings = ClusterSettings(members=(node.member,), lookup_budget_s=1.0, curve=curve)
        lookup = settings.lookup()
        try:
            return asyncio.run(lookup.tokens(ids, [LOOKUP]))[0]
        finally:
            lookup.close()

    assert held(client) == 512
    assert held(None) == 0  # plain TCP to a CurveZMQ node: nothing, within the budget


def test_each_engine_is_credited_only_with_the_chunks_its_own_namespace_holds(start_cluster):
    """Two tenants' engines (salts from the operator) and one without a connector: the cluster
    holds tenant a's chunks, so only a's engine can load them; a request with its own
    cache_salt or for a LoRA adapter finds none of the plain requests' chunks."""
    cluster = start_cluster(1)
    ids = list(range(3 * 256 + 5))
    tenant_a = EngineKeySettings(model="m", kv_dtype="bfloat16", tenant_salt="salt-a")
    tenant_b = EngineKeySettings(model="m", kv_dtype="bfloat16", tenant_salt="salt-b")
    with ClusterClient(cluster.members) as client:
        keys = chunk_keys(ids, tenant_a.namespace(), 256)
        assert all(client.put(keys, [b"kv"] * len(keys)))
    engines = [
        Engine("ml/a", "http://a", keys=tenant_a, models={"m": "", "sql": "sql"}),
        Engine("team-b/b", "http://b", keys=tenant_b),
        Engine("plain", "http://c"),
    ]
    lookup = ClusterLookup(lambda: ClusterClient(cluster.members), budget_s=1.0)
    policy = PrefixPolicy(PolicySettings(block_size=BLOCK), cluster=lookup)
    try:

        def credited(payload: dict) -> dict[str, int]:
            request = {"prompt": ids, **payload}
            return asyncio.run(policy._cluster_tokens(ids[:-1], request, engines))

        assert credited({"model": "m"}) == {"ml/a": 768, "team-b/b": 0}
        assert credited({"model": "m", "cache_salt": "user-1"}) == {"ml/a": 0, "team-b/b": 0}
        assert credited({"model": "sql"}) == {"ml/a": 0, "team-b/b": 0}
        assert lookup.hit_tokens == 768
    finally:
        lookup.close()


def test_text_mode_remembers_a_routed_prefix_for_the_history_ttl_whatever_the_events_say():
    """With no tokenizer no KV event ever names a text chunk: a conversation whose next turn
    comes after the speculative TTL (think time) must still find its engine."""
    text = "You are a helpful assistant. " * 40
    chat = {"messages": [{"role": "system", "content": text}, {"role": "user", "content": "hi"}]}
    settings = PolicySettings(block_size=BLOCK, speculative_ttl_s=0.05, history_ttl_s=300)
    policy = PrefixPolicy(settings, events={"a": EngineEvents("tcp://a:1")})
    engine = Engine("a", "http://a")  # it publishes KV events, which never name text chunks
    decision = asyncio.run(policy.rank("/v1/chat/completions", chat, [engine]))
    policy.routed(decision, engine)
    policy.first_byte(decision, engine)
    time.sleep(0.2)  # four speculative TTLs of think time
    assert policy.index.match(decision.block_hashes) == {"a": len(decision.block_hashes)}


def test_requests_with_vllm_extra_keys_are_not_matched_against_the_index():
    """vLLM's block hashes bind a request's LoRA adapter and images; the router's hashes do not
    yet, so such requests must not be steered by blocks vLLM keeps apart."""
    ids = list(range(8 * BLOCK))
    policy = PrefixPolicy(PolicySettings(block_size=BLOCK))
    engines = [Engine("a", "http://a", models={"base": "", "sql": "sql"})]
    policy.index.add_speculative("a", block_hashes(ids, BLOCK, "0"), ttl_s=300)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for path, payload in [
        ("/v1/completions", {"prompt": ids, "model": "sql"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [image]}]}),
    ]:
        decision = asyncio.run(policy.rank(path, payload, engines))
        assert decision.block_hashes == []
    plain = asyncio.run(policy.rank("/v1/completions", {"prompt": ids, "model": "base"}, engines))
    assert policy.index.match(plain.block_hashes) == {"a": 8}
    # a cache_salt is hashed as vLLM hashes it (checked against real vLLM in
    # test_vllm_routing.py): salted requests match only blocks of their own salt
    salted = {"prompt": ids, "model": "base", "cache_salt": "user-1"}
    decision = asyncio.run(policy.rank("/v1/completions", salted, engines))
    assert decision.block_hashes == block_hashes(ids, BLOCK, "0", "user-1")
    assert policy.index.match(decision.block_hashes) == {}
    assert set(decision.block_hashes).isdisjoint(plain.block_hashes)
