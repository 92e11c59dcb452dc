"""kvcache's routing policy, live: from an OpenAI request to a ranking of the engines.

The request is tokenized as the engine will see it and cut into vLLM's block hashes (precise
mode; a prompt sent as token ids needs no tokenizer), or its text into character chunks when no
tokenizer is given (approximate mode). The prefix
index says how many leading blocks each engine holds; the cache cluster, asked in one batched
lookup, how many leading chunks any engine could load instead; the engines' gauges and the
router's own counts say how busy each is. `score.rank_engines` turns that into the ranking.

The index learns from three sources: vLLM's KV events (one subscriber per engine that publishes
them), and the router's own decisions, entered right after routing as speculative entries: with
events they cover the moment before the engine's own event arrives and expire after
`speculative_ttl_s`; for an engine without events, and for text chunks (which no event ever
names), they are all the router knows, and are kept for `history_ttl_s`.

The cluster is asked per engine namespace: each engine publishes what its connector binds into
chunk keys, and with the salt the operator gave it and the request's own `cache_salt` and LoRA
adapter (`Namespace.for_request`) the router names exactly the chunks that engine could load.
vLLM's block hashes also bind a request's `cache_salt` (the router's do too) and its LoRA
adapter and images, which the router's hashes do not yet: such requests are not matched
against the index.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import xxhash
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from kvcache.client.cluster import ClusterClient
from kvcache.core.keys import Namespace, chunk_keys
from kvcache.router.block_hash import BlockHasher
from kvcache.router.engines import Engine
from kvcache.router.hash_check import HashCheck
from kvcache.router.kv_events import EventBatch, KVEventSubscriber
from kvcache.router.prefix_index import PrefixIndex
from kvcache.router.score import (
    EngineState,
    RouteRequest,
    ScoreSettings,
    affinity_block,
    rank_engines,
)
from kvcache.router.tokenize import (
    TEXT_CHUNK_CHARS,
    Prompt,
    Tokenizer,
    prompt_token_ids,
    request_text,
)

log = logging.getLogger(__name__)
CHARS_PER_TOKEN = 4  # approximate mode's guess, to weigh text chunks as tokens


@dataclass(frozen=True)
class PolicySettings:
    block_size: int = 16  # the engines' KV block size (vLLM's --block-size; 128 on the CPU)
    hash_seed: str = "0"  # the engines' PYTHONHASHSEED (sha256_cbor block hashes)
    speculative_ttl_s: float = 5.0
    history_ttl_s: float = 300.0
    index_capacity_blocks: int = 65_536  # per engine; size it from the engines' block count
    score: ScoreSettings = field(default_factory=ScoreSettings)


@dataclass(frozen=True)
class EngineEvents:
    """Where an engine publishes its KV events (and serves their replay)."""

    endpoint: str
    replay_endpoint: str | None = None


@dataclass(frozen=True)
class ChunkLookup:
    """Whose chunks to look for: one engine namespace (with the request's salt and adapter)."""

    namespace: Namespace
    chunk_tokens: int


class ClusterLookup:
    """How much of a prompt the cache cluster holds, in tokens, for each engine namespace asked:
    the connectors' chunk keys, asked in batched lookups on a thread of its own (ZeroMQ sockets
    are not thread safe, and a slow cluster must never stall the event loop).

    A request waits at most `budget_s` for the answer and is routed without it past that: a node
    that stopped answering costs the client's timeout (then its down-backoff), and requests must
    not queue behind it. A lookup answered late is dropped, and the thread moves on."""

    def __init__(self, client: Callable[[], ClusterClient], budget_s: float = 0.02) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvcache-lookup")
        self._client = self._executor.submit(client).result()
        self.budget_s = budget_s
        self.lookups = 0  # prompts asked about (answered within the budget)
        self.hit_tokens = 0  # the longest prefix any namespace held of each, summed

    def _lookup(self, token_ids: list[int], lookups: list[ChunkLookup]) -> list[int]:
        found = []
        for lookup in lookups:
            keys = chunk_keys(token_ids, lookup.namespace, lookup.chunk_tokens)
            found.append(self._client.lookup_prefix(keys) * lookup.chunk_tokens if keys else 0)
        return found

    async def tokens(self, token_ids: list[int], lookups: list[ChunkLookup]) -> list[int]:
        """Tokens of `token_ids` each lookup's namespace holds (0 past the budget)."""
        if not lookups:
            return []
        loop = asyncio.get_running_loop()
        asked = loop.run_in_executor(self._executor, self._lookup, token_ids, lookups)
        try:
            found = await asyncio.wait_for(asked, self.budget_s)
        except TimeoutError:
            log.debug(
                "cluster lookup over its %.0f ms budget; routing without it", 1e3 * self.budget_s
            )
            return [0] * len(lookups)
        except Exception:  # noqa: BLE001 - a cluster that fails holds nothing
            log.warning("cluster lookup failed", exc_info=True)
            return [0] * len(lookups)
        self.lookups += 1
        self.hit_tokens += max(found)
        return found

    def close(self) -> None:
        self._executor.submit(self._client.close).result()
        self._executor.shutdown()


def engine_lookup(engine: Engine, payload: dict) -> ChunkLookup | None:
    """The chunks `engine`'s connector would load for this request: its published key settings
    with the operator's salt, the request's `cache_salt` and the LoRA adapter its `model` names
    there (`Namespace.for_request`, as the connector keys it); None without a connector."""
    if engine.keys is None:
        return None
    model, salt = payload.get("model"), payload.get("cache_salt")
    lora = engine.models.get(model, "") if isinstance(model, str) else ""
    namespace = engine.keys.namespace().for_request(lora, salt if isinstance(salt, str) else None)
    return ChunkLookup(namespace, engine.keys.chunk_tokens)


@dataclass
class Decision:
    ranking: list[Engine]
    block_hashes: list[int]
    by_text: bool = False  # text chunks: no engine event will ever confirm them
    speculated_at: float | None = None  # when `routed` entered the blocks (monotonic)


def has_extra_keys(path: str, payload: dict, engines: list[Engine]) -> bool:
    """Whether vLLM's block hashes for this request bind more than its tokens and `cache_salt`
    (which the hashes carry): a LoRA adapter (with its path), or images and other non-text
    parts (vLLM's extra keys)."""
    model = payload.get("model")
    if isinstance(model, str) and any(engine.models.get(model) for engine in engines):
        return True
    if path.endswith("chat/completions"):
        for message in payload.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                isinstance(part, dict) and part.get("type", "text") != "text" for part in content
            ):
                return True
    return False


def text_chunk_hashes(text: str, cache_salt: str | None = None) -> list[int]:
    """Approximate mode's blocks: chained 64-bit hashes of the text's full 128-char chunks,
    chained from the request's `cache_salt` when it has one (salted prompts share no blocks with
    others in vLLM either)."""
    hashes = []
    parent = xxhash.xxh3_64_intdigest(cache_salt.encode("utf-8")) if cache_salt else 0
    for start in range(0, len(text) - TEXT_CHUNK_CHARS + 1, TEXT_CHUNK_CHARS):
        chunk = text[start : start + TEXT_CHUNK_CHARS].encode("utf-8", "surrogatepass")
        parent = xxhash.xxh3_64_intdigest(chunk, seed=parent)
        hashes.append(parent)
    return hashes


class PrefixPolicy:
    def __init__(
        self,
        settings: PolicySettings,
        tokenizer: Tokenizer | None = None,
        cluster: ClusterLookup | None = None,
        events: dict[str, EngineEvents] | None = None,
    ) -> None:
        self.settings = settings
        self.index = PrefixIndex(settings.index_capacity_blocks)
        self._hasher = BlockHasher(settings.block_size, settings.hash_seed)
        self.hash_check = HashCheck(self._hasher)
        self._tokenizer = tokenizer
        self._cluster = cluster
        self._events = events or {}
        self.index_engines: set[str] = set(self._events)
        self._subscribers: dict[str, asyncio.Task] = {}
        self._running = False

    async def run(self) -> None:
        """Follow every engine's KV events into the index, until cancelled."""
        self._running = True
        self._sync_subscribers()
        try:
            await asyncio.Event().wait()
        finally:
            self._running = False
            tasks = list(self._subscribers.values())
            self._subscribers.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def set_engines(self, events: dict[str, EngineEvents | None]) -> None:
        """The engines now in the fleet (discovery), with where they publish KV events: a new
        engine's events are followed, a gone engine's are dropped from the index."""
        for name in set(self.index_engines) - set(events):
            self.index.remove(name)
            self.hash_check.forget(name)
        for name in set(events) - set(self.index_engines):
            self.index.add_engine(name)
        self.index_engines = set(events)
        self._events = {name: where for name, where in events.items() if where is not None}
        if self._running:
            self._sync_subscribers()

    def _sync_subscribers(self) -> None:
        for name in set(self._subscribers) - set(self._events):
            self._subscribers.pop(name).cancel()
        for name, where in self._events.items():
            if name not in self._subscribers:
                subscriber = KVEventSubscriber(
                    name, where.endpoint, where.replay_endpoint, self._events_arrived
                )
                self._subscribers[name] = asyncio.create_task(subscriber.run())

    def _events_arrived(self, engine: str, batch: EventBatch) -> None:
        self.hash_check.observe(engine, batch)
        self.index.apply(engine, batch)

    def _prompt(self, path: str, payload: dict) -> Prompt:
        token_ids = prompt_token_ids(path, payload)  # vLLM takes them as is: no tokenizer needed
        if token_ids is not None:
            return Prompt(token_ids, "")
        if self._tokenizer is not None:
            try:
                return self._tokenizer.prompt(path, payload)
            except Exception:  # noqa: BLE001 - the engine will answer a malformed request
                log.debug("tokenizing failed; routing by text", exc_info=True)
        return Prompt(None, request_text(path, payload))

    async def rank(self, path: str, payload: dict, engines: list[Engine]) -> Decision:
        prompt = self._prompt(path, payload)
        salt = payload.get("cache_salt")
        salt = salt if isinstance(salt, str) and salt else None
        if prompt.token_ids is not None:
            block_tokens = self.settings.block_size
            hashes = self._hasher.hashes(prompt.token_ids, salt)
            prompt_tokens = len(prompt.token_ids)
        else:
            block_tokens = TEXT_CHUNK_CHARS // CHARS_PER_TOKEN
            hashes = text_chunk_hashes(prompt.text, salt)
            prompt_tokens = max(1, len(prompt.text) // CHARS_PER_TOKEN)
        affinity = (
            affinity_block(hashes, block_tokens, self.settings.score)
            if hashes
            else xxhash.xxh3_64_intdigest(prompt.text.encode("utf-8", "surrogatepass"))
        )
        if has_extra_keys(path, payload, engines):
            hashes = []  # they would match blocks vLLM keeps apart
        matched = self.index.match(hashes) if hashes else {}
        cluster_tokens: dict[str, int] = {}
        if self._cluster is not None and prompt.token_ids is not None:
            cluster_tokens = await self._cluster_tokens(prompt.token_ids[:-1], payload, engines)
        states = [
            EngineState(
                name=engine.name,
                gpu_tokens=matched.get(engine.name, 0) * block_tokens,
                cluster_tokens=cluster_tokens.get(engine.name, 0),
                running=engine.running,
                waiting=engine.waiting,
                in_flight=engine.in_flight,
                awaiting_first_token=engine.awaiting_first_token,
                cached_blocks=self.index.blocks(engine.name),
                healthy=engine.healthy,
            )
            for engine in engines
        ]
        ranking = rank_engines(RouteRequest(prompt_tokens, affinity), states, self.settings.score)
        by_name = {engine.name: engine for engine in engines}
        by_text = prompt.token_ids is None
        return Decision([by_name[candidate.name] for candidate in ranking], hashes, by_text)

    async def _cluster_tokens(
        self, token_ids: list[int], payload: dict, engines: list[Engine]
    ) -> dict[str, int]:
        """What each engine could load of the prompt from the cluster: one lookup per engine
        namespace among them (engines that publish no key settings get nothing)."""
        assert self._cluster is not None
        groups: dict[ChunkLookup, list[str]] = {}
        for engine in engines:
            lookup = engine_lookup(engine, payload)
            if lookup is not None:
                groups.setdefault(lookup, []).append(engine.name)
        found = await self._cluster.tokens(token_ids, list(groups))
        return {name: tokens for names, tokens in zip(groups.values(), found) for name in names}

    def routed(self, decision: Decision, engine: Engine) -> None:
        """The prompt's blocks are on `engine` soon: say so before its events do."""
        if not decision.block_hashes:
            return
        ttl_s = self.settings.history_ttl_s if decision.by_text else self._ttl_s(engine)
        self.index.add_speculative(engine.name, decision.block_hashes, ttl_s)
        decision.speculated_at = time.monotonic()

    def first_byte(self, decision: Decision, engine: Engine) -> None:
        """The prefill is done: the speculative entries' clock restarts here, so a request that
        queued longer than their TTL still keeps its prefix's later requests on its engine. A
        prefill done within a quarter of the TTL leaves them be: rewriting a 4K-token prompt's
        entries costs as much as ranking it."""
        if decision.speculated_at is None or decision.by_text:
            return  # text entries are kept for the history TTL from routing on
        if time.monotonic() - decision.speculated_at >= self._ttl_s(engine) / 4:
            self.routed(decision, engine)

    def _ttl_s(self, engine: Engine) -> float:
        if engine.name in self._events:
            return self.settings.speculative_ttl_s
        return self.settings.history_ttl_s

    def metrics(self) -> list[Metric]:
        checks = GaugeMetricFamily(
            "kvcache_router_block_hash_check",
            "whether the engine hashes blocks as the router does (its first stored blocks)",
            labels=["engine", "result"],
        )
        for engine, verdict in sorted(self.hash_check.verdicts().items()):
            checks.add_metric([engine, verdict], 1)
        families: list[Metric] = [checks]
        if self._cluster is not None:
            families += [
                CounterMetricFamily(
                    "kvcache_router_cluster_lookups",
                    "prompts the cache cluster answered for",
                    value=self._cluster.lookups,
                ),
                CounterMetricFamily(
                    "kvcache_router_cluster_hit_tokens",
                    "prompt tokens the cache cluster held (the longest prefix of any engine "
                    "namespace asked)",
                    value=self._cluster.hit_tokens,
                ),
            ]
        return families

    def engine_down(self, engine: Engine) -> None:
        """An engine that left the rotation may come back restarted, with an empty cache. Its
        KV events tell when it does (the subscriber sees the seqs start over and resets it), so
        only an engine without them is forgotten here: an engine that missed two scrapes while
        busy keeps its prefixes, which vLLM would not announce again."""
        if engine.name not in self._events:
            self.index.clear(engine.name)
