"""Routing policies compared on simulated fleets: reused prefix tokens, TTFT and load spread.

    python benchmarks/routing.py [--seed 1] [--out benchmarks/results/routing.json]
                                 [--plot docs/routing.png]
    python benchmarks/routing.py --sweep   # ScoreSettings candidates on the 8-engine traces

Traces (seeded; every policy sees the same requests at the same times):
- chat: 1,600 conversations behind one 512-token system prompt; each turn's prompt is the whole
  history (earlier messages and answers) plus a new message, sent a think time (15 s mean) after
  the previous answer.
- rag: questions about 1,000 documents (1-6K tokens) drawn with a Zipf law (the hottest one
  gets 13% of the questions, more than an eighth), each prompt a 256-token system prompt, one
  document and a question.
- agent: tasks behind one 6,144-token system prompt (tools); each step appends the model's
  action and the tool's result, and the next step follows the tool's latency.
- shared-prefix: llm-d's benchmark workload (inference-perf `shared_prefix`, its precise-prefix
  guide): 150 groups of a 6,000-token system prompt and 5 questions of 1,200 tokens, after a
  warm-up at a lower rate.
Arrivals are fixed by the seed (open loop), so an overloaded fleet is spared none of its load; a
turn that arrives before its predecessor finished finds less cached, as it would.

Engines. A prompt is a chain of 16-token blocks whose ids hash their whole prefix, as in vLLM's
prefix caching. Each engine has a GPU prefix cache of `cache_blocks` blocks with LRU eviction; a
request's blocks are touched last block first, as vLLM frees them, so a prefix outlives its
extensions and the cache holds whole prefixes. An engine is one FCFS prefill server (service =
prefill of the blocks it lacks + loading of those it takes from the cluster; its last block is
always computed); then the request decodes for `decode_s_per_token` per output token beside the
others, counted as running. Why one server: TTFT is set by the prefill work queued ahead, and a
GPU's prefill throughput is one shared resource (chunked prefill batches prompts up to a token
budget); a decode step costs little next to a prefill chunk, so decoding requests hold a slot and
KV blocks (vLLM's running gauge, KV usage) without slowing prefills. Answers are cached when a
request finishes (vLLM caches generated blocks). Not modelled: preemption when KV runs out,
network and tokenization time. Prefill runs at 2,500 tokens/s and only ratios matter: scaling
every cost scales every TTFT.

The cache cluster (kvcache) holds every full 256-token chunk of every prompt an engine prefilled,
and never evicts. Engines load from it only under the policies that use it (kvcache and the
oracle); the peers run on plain vLLM engines, as they are deployed. `kvcache-gpu` is kvcache's
policy on those plain engines: the router alone, against the same engines as the peers.

Policies, with the defaults each documents:
- round-robin; least-load: fewest running + waiting requests, ties at random.
- session: production-stack's session router, a consistent-hash ring (160 points per engine) on
  the session id (the conversation, the RAG user, the agent task, the llm-d prompt).
- sglang: SGLang's cache-aware router on HTTP text: cache_threshold 0.3, balance_abs_threshold
  64, balance_rel_threshold 1.5, load = the router's in-flight count. Imbalanced (both
  thresholds) -> least loaded; else the worker with the longest match in its approximate tree
  when match/text > 0.3, else the worker with the smallest tree; ties go to the first worker.
  The tree is every text routed to the worker, matched at block granularity; never evicted
  (max_tree_size, 2^26 characters, exceeds every trace).
- prefixaware: production-stack's: a trie of 128-character chunks of the prompt text (4
  characters per token), the engines with the longest match, one of them at random (any engine
  when nothing matches); never evicted.
- llm-d: its precise-prefix-cache-aware guide: precise-prefix-cache-scorer (weight 2: the
  longest run of the request's blocks an engine holds per its KV events, min-max normalized over
  the engines that hold any), kv-cache-utilization-scorer (weight 1: 1 - KV usage), queue-scorer
  (weight 1: waiting requests, min-max normalized), max-score-picker (random among ties);
  speculativeIndexing off (its default). Events are modelled as instant. KV usage counts a prefix
  shared by running requests once per request (vLLM counts it once): overstated usage only
  spreads llm-d's traffic more.
- kvcache: `kvcache.router.score.rank_engines`, default `ScoreSettings`. Its GPU prefix comes
  from the engine's blocks (its KV events) and its own routing history: a prompt it sent counts
  as on the engine until that prompt's first token (when the engine's events have it).
- oracle: knows every engine's cache and queue, and sends each request where its own TTFT is
  least: the work queued ahead (each request's service as estimated when it was queued, counting
  prompts queued ahead of it as cached) plus its own service (GPU hits free, cluster loads at
  their cost, the rest prefilled). Greedy per request: the best a router with perfect knowledge
  does without planning ahead, which a policy can beat by a little.

Reported per trace x engines x policy: reused_tokens = prompt tokens served from the engine's GPU
cache plus, for the policies that use the cluster, tokens loaded from it (gpu_hit_tokens: the GPU
part alone); oracle_tokens = the oracle's reused_tokens on the same trace and fleet; TTFT =
arrival to the end of prefill; max_mean_load = requests served by the busiest engine over the
mean. chat, rag and agent run on 8 engines of 512K cached tokens; shared-prefix on 4 engines of
256K, where the fleet's GPUs just hold the 150 system prompts and spreading by load alone
overloads it: the regime of llm-d's capacity run on 4 pods (TTFT p90 0.28 s for precise prefix
scoring, 7.5 s for approximate prefix, 78 s for load only).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import itertools
import json
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from kvcache.router.score import (
    EngineState,
    RouteRequest,
    ScoreSettings,
    affinity_block,
    rank_engines,
)

BLOCK_TOKENS = 16
CHARS_PER_TOKEN = 4
TEXT_CHUNK_BLOCKS = 128 // CHARS_PER_TOKEN // BLOCK_TOKENS  # production-stack's 128 characters
ROOT = 0x6B766361636865  # parent of every chain's first block

# ---------------------------------------------------------------------------------------- traces


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """One request: its prompt is the first `prompt_blocks` of `chain` (the block ids of its
    session's whole token stream, shared by the session's requests); its answer is the next
    `answer_blocks`."""

    arrival_s: float
    session: int
    chain: list[int]
    prompt_blocks: int
    answer_blocks: int

    @property
    def prompt_tokens(self) -> int:
        return self.prompt_blocks * BLOCK_TOKENS


class Chains:
    """Block ids for new content: each block is distinct text, its id hashes its parent's id."""

    def __init__(self) -> None:
        self._content = itertools.count(1)

    def extend(self, chain: list[int], tokens: int) -> None:
        parent = chain[-1] if chain else ROOT
        for _ in range(-(-tokens // BLOCK_TOKENS)):
            parent = hash((parent, next(self._content)))
            chain.append(parent)


@dataclass(frozen=True)
class ChatTrace:
    conversations: int = 1600
    start_window_s: float = 300.0  # conversations start uniformly at random in this window
    system_tokens: int = 512
    first_message_tokens: tuple[int, int] = (64, 1536)
    message_tokens: tuple[int, int] = (32, 256)
    answer_tokens: tuple[int, int] = (64, 512)
    turns: tuple[int, int] = (2, 12)
    think_s: float = 15.0  # mean (exponential) from the end of an answer to the next message
    max_context_tokens: int = 16384
    answer_s_per_token: float = 0.02  # spacing only: the nominal decode time of an answer


def chat_trace(spec: ChatTrace, seed: int) -> list[Request]:
    rng = random.Random(seed)
    chains = Chains()
    system: list[int] = []
    chains.extend(system, spec.system_tokens)
    requests = []
    for session in range(spec.conversations):
        chain = list(system)
        chains.extend(chain, rng.randint(*spec.first_message_tokens))
        arrival = rng.uniform(0.0, spec.start_window_s)
        for _ in range(rng.randint(*spec.turns)):
            answer = rng.randint(*spec.answer_tokens)
            prompt_blocks = len(chain)
            chains.extend(chain, answer)
            requests.append(
                Request(arrival, session, chain, prompt_blocks, len(chain) - prompt_blocks)
            )
            arrival += answer * spec.answer_s_per_token + rng.expovariate(1.0 / spec.think_s)
            chains.extend(chain, rng.randint(*spec.message_tokens))
            if len(chain) * BLOCK_TOKENS > spec.max_context_tokens:
                break
    return sorted(requests, key=lambda r: r.arrival_s)


@dataclass(frozen=True)
class RagTrace:
    requests: int = 4800
    rate_per_s: float = 12.0  # Poisson arrivals
    documents: int = 1000
    document_tokens: tuple[int, int] = (1024, 6144)
    zipf_s: float = 1.0  # document k (from 1) is asked about with weight k^-s
    system_tokens: int = 256
    question_tokens: tuple[int, int] = (32, 256)
    answer_tokens: tuple[int, int] = (64, 384)
    users: int = 800  # the session a request belongs to, uniformly


def rag_trace(spec: RagTrace, seed: int) -> list[Request]:
    rng = random.Random(seed)
    chains = Chains()
    system: list[int] = []
    chains.extend(system, spec.system_tokens)
    documents = []
    for _ in range(spec.documents):
        document = list(system)
        chains.extend(document, rng.randint(*spec.document_tokens))
        documents.append(document)
    weights = list(itertools.accumulate(k**-spec.zipf_s for k in range(1, spec.documents + 1)))
    requests = []
    arrival = 0.0
    for _ in range(spec.requests):
        arrival += rng.expovariate(spec.rate_per_s)
        document = documents[bisect.bisect(weights, rng.random() * weights[-1])]
        chain = list(document)
        chains.extend(chain, rng.randint(*spec.question_tokens))
        prompt_blocks = len(chain)
        chains.extend(chain, rng.randint(*spec.answer_tokens))
        requests.append(
            Request(
                arrival, rng.randrange(spec.users), chain, prompt_blocks, len(chain) - prompt_blocks
            )
        )
    return requests


@dataclass(frozen=True)
class AgentTrace:
    tasks: int = 1400
    rate_per_s: float = 5.0  # Poisson task starts
    system_tokens: int = 6144  # instructions and tool definitions, shared by every task
    task_tokens: tuple[int, int] = (64, 512)
    steps: tuple[int, int] = (1, 6)
    action_tokens: tuple[int, int] = (32, 256)  # the model's answer at each step
    observation_tokens: tuple[int, int] = (128, 1024)  # the tool's result, appended
    tool_s: tuple[float, float] = (0.5, 3.0)
    answer_s_per_token: float = 0.02


def agent_trace(spec: AgentTrace, seed: int) -> list[Request]:
    rng = random.Random(seed)
    chains = Chains()
    system: list[int] = []
    chains.extend(system, spec.system_tokens)
    requests = []
    start = 0.0
    for session in range(spec.tasks):
        start += rng.expovariate(spec.rate_per_s)
        arrival = start
        chain = list(system)
        chains.extend(chain, rng.randint(*spec.task_tokens))
        for _ in range(rng.randint(*spec.steps)):
            action = rng.randint(*spec.action_tokens)
            prompt_blocks = len(chain)
            chains.extend(chain, action)
            requests.append(
                Request(arrival, session, chain, prompt_blocks, len(chain) - prompt_blocks)
            )
            arrival += action * spec.answer_s_per_token + rng.uniform(*spec.tool_s)
            chains.extend(chain, rng.randint(*spec.observation_tokens))
    return sorted(requests, key=lambda r: r.arrival_s)


@dataclass(frozen=True)
class SharedPrefixTrace:
    """llm-d's benchmark workload (inference-perf `shared_prefix`, the precise-prefix guide):
    each request is one of `groups` system prompts and one of that group's questions."""

    requests: int = 3000
    rate_per_s: float = 3.0  # Poisson arrivals
    warmup_requests: int = 600  # arrive first, at warmup_rate_per_s, to seat the prefixes
    warmup_rate_per_s: float = 2.0
    groups: int = 150
    questions_per_group: int = 5
    system_tokens: int = 6000
    question_tokens: int = 1200
    answer_tokens: int = 1000


def shared_prefix_trace(spec: SharedPrefixTrace, seed: int) -> list[Request]:
    rng = random.Random(seed)
    chains = Chains()
    prompts = []
    for _ in range(spec.groups):
        system: list[int] = []
        chains.extend(system, spec.system_tokens)
        for _ in range(spec.questions_per_group):
            prompt = list(system)
            chains.extend(prompt, spec.question_tokens)
            prompts.append(prompt)
    requests = []
    arrival = 0.0
    for i in range(spec.requests):
        warming = i < spec.warmup_requests
        arrival += rng.expovariate(spec.warmup_rate_per_s if warming else spec.rate_per_s)
        session = rng.randrange(len(prompts))
        chain = list(prompts[session])
        chains.extend(chain, spec.answer_tokens)  # every answer is new text
        prompt_blocks = len(prompts[session])
        requests.append(Request(arrival, session, chain, prompt_blocks, len(chain) - prompt_blocks))
    return requests


TRACES: dict[str, Callable[[int], list[Request]]] = {
    "chat": lambda seed: chat_trace(ChatTrace(), seed),
    "rag": lambda seed: rag_trace(RagTrace(), seed),
    "agent": lambda seed: agent_trace(AgentTrace(), seed),
    "shared-prefix": lambda seed: shared_prefix_trace(SharedPrefixTrace(), seed),
}

# --------------------------------------------------------------------------------------- engines


@dataclass(frozen=True)
class EngineModel:
    cache_blocks: int = 32768  # 524,288 tokens
    prefill_s_per_token: float = 4e-4  # 2,500 tokens/s
    load_s_per_token: float = 4e-5  # a tenth of prefill (benchmarks/ttft.py measured 1/21.5 on CPU)
    decode_s_per_token: float = 0.02
    cluster_chunk_blocks: int = 16  # kvcache's chunk_tokens = 256


# (trace, engines, engine model); see the module's docstring for why shared-prefix differs
RUNS = [
    ("chat", 8, EngineModel()),
    ("rag", 8, EngineModel()),
    ("agent", 8, EngineModel()),
    ("shared-prefix", 4, EngineModel(cache_blocks=16384)),
]


def prefix_length(held: Container[int], chain: list[int], blocks: int) -> int:
    """How many of the first `blocks` of `chain` `held` contains, for a prefix-closed `held`
    (every ancestor of a held block is held), by binary search."""
    low, high = 0, blocks
    while low < high:
        middle = (low + high + 1) // 2
        if chain[middle - 1] in held:
            low = middle
        else:
            high = middle - 1
    return low


class Cluster:
    """Every full chunk any engine prefilled; a prompt's loadable prefix ends at a chunk
    boundary."""

    def __init__(self, chunk_blocks: int) -> None:
        self.chunk_blocks = chunk_blocks
        self.ends: set[int] = set()  # the id of each stored chunk's last block

    def stored_prefix(self, chain: list[int], blocks: int) -> int:
        size = self.chunk_blocks
        low, high = 0, blocks // size
        while low < high:
            middle = (low + high + 1) // 2
            if chain[middle * size - 1] in self.ends:
                low = middle
            else:
                high = middle - 1
        return low * size

    def store(self, chain: list[int], blocks: int) -> None:
        size = self.chunk_blocks
        self.ends.update(chain[end - 1] for end in range(size, blocks + 1, size))


class Engine:
    """One vLLM engine: a GPU prefix cache and a FCFS prefill server."""

    def __init__(self, model: EngineModel) -> None:
        self.model = model
        self.cache: OrderedDict[int, None] = OrderedDict()
        self.queue: deque[tuple[Request, float]] = deque()
        self.pending: dict[int, int] = {}  # block of a queued prompt -> queued prompts with it
        self.busy_until: float | None = None
        self.queued_s = 0.0  # service estimates of the queued requests
        self.running = 0  # prefilling or decoding
        self.active_blocks = 0  # KV blocks of the running requests
        self.served = 0

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def gpu_prefix(self, request: Request) -> int:
        """The request's prefix in the GPU cache now: what the engine's KV events report."""
        return prefix_length(self.cache, request.chain, request.prompt_blocks)

    def expected_prefix(self, request: Request) -> int:
        """The prefix the engine will hold when the request's turn comes: cached now, or in a
        prompt queued ahead of it (what a router that records where it sent each prompt knows).
        Both sets hold whole prefixes, so their union's longest prefix is the longer one."""
        queued = prefix_length(self.pending, request.chain, request.prompt_blocks)
        return max(self.gpu_prefix(request), queued)

    def service_s(
        self, request: Request, cluster: Cluster | None, gpu_blocks: int
    ) -> tuple[float, int, int]:
        """(service time, GPU-hit blocks, loaded blocks) with `gpu_blocks` of the prompt on the
        GPU. The last block is always computed: vLLM recomputes a prompt's last token even on a
        full hit."""
        reusable = request.prompt_blocks - 1
        gpu = min(gpu_blocks, reusable)
        stored = cluster.stored_prefix(request.chain, reusable) if cluster else 0
        loaded = max(0, stored - gpu)
        computed = request.prompt_blocks - gpu - loaded
        model = self.model
        seconds = BLOCK_TOKENS * (
            computed * model.prefill_s_per_token + loaded * model.load_s_per_token
        )
        return seconds, gpu, loaded

    def expected_service_s(self, request: Request, cluster: Cluster | None) -> float:
        return self.service_s(request, cluster, self.expected_prefix(request))[0]

    def backlog_s(self, now: float) -> float:
        current = max(0.0, self.busy_until - now) if self.busy_until is not None else 0.0
        return current + self.queued_s

    def enqueue(self, request: Request, cluster: Cluster | None) -> None:
        estimate = self.expected_service_s(request, cluster)
        self.queue.append((request, estimate))
        self.queued_s += estimate
        self.served += 1
        pending = self.pending
        for block in request.chain[: request.prompt_blocks]:
            pending[block] = pending.get(block, 0) + 1

    def start(self, now: float, cluster: Cluster | None) -> tuple[Request, float, int, int]:
        """Take the next queued request: (request, service time, GPU-hit and loaded blocks)."""
        request, estimate = self.queue.popleft()
        self.queued_s -= estimate
        service, gpu, loaded = self.service_s(request, cluster, self.gpu_prefix(request))
        self.running += 1
        self.active_blocks += request.prompt_blocks + request.answer_blocks
        self.busy_until = now + service
        return request, service, gpu, loaded

    def prefilled(self, request: Request) -> None:
        self.busy_until = None
        self._touch(request.chain, request.prompt_blocks)
        pending = self.pending
        for block in request.chain[: request.prompt_blocks]:
            left = pending[block] - 1
            if left:
                pending[block] = left
            else:
                del pending[block]

    def finished(self, request: Request) -> None:
        self.running -= 1
        self.active_blocks -= request.prompt_blocks + request.answer_blocks
        self._touch(request.chain, request.prompt_blocks + request.answer_blocks)

    def _touch(self, chain: list[int], blocks: int) -> None:
        """Make the blocks the youngest, the last one first (vLLM frees a request's blocks in
        reverse, so a prefix outlives its extensions), and evict the oldest past capacity."""
        cache = self.cache
        for block in reversed(chain[:blocks]):
            cache[block] = None
            cache.move_to_end(block)
        while len(cache) > self.model.cache_blocks:
            cache.popitem(last=False)


@dataclass
class Fleet:
    engines: list[Engine]
    cluster: Cluster | None  # None: plain engines, nothing loaded from a cluster
    now: float = 0.0


# -------------------------------------------------------------------------------------- policies


class Policy(Protocol):
    name: str
    uses_cluster: bool

    def choose(self, request: Request, fleet: Fleet) -> int: ...


class RoundRobin:
    name, uses_cluster = "round-robin", False

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, request: Request, fleet: Fleet) -> int:
        return next(self._next) % len(fleet.engines)


class LeastLoad:
    name, uses_cluster = "least-load", False

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: Request, fleet: Fleet) -> int:
        loads = [engine.running + engine.waiting for engine in fleet.engines]
        least = min(loads)
        return self._rng.choice([i for i, load in enumerate(loads) if load == least])


class SessionAffinity:
    name, uses_cluster = "session", False
    points_per_engine = 160

    def __init__(self, engines: int) -> None:
        self._ring = sorted(
            (self._point(f"engine-{e}-{p}"), e)
            for e in range(engines)
            for p in range(self.points_per_engine)
        )

    @staticmethod
    def _point(text: str) -> int:
        return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "little")

    def choose(self, request: Request, fleet: Fleet) -> int:
        at = bisect.bisect(self._ring, (self._point(f"session-{request.session}"), -1))
        return self._ring[at % len(self._ring)][1]


class SGLangCacheAware:
    name, uses_cluster = "sglang", False
    cache_threshold = 0.3
    balance_abs_threshold = 64
    balance_rel_threshold = 1.5

    def __init__(self, engines: int) -> None:
        self._trees: list[set[int]] = [set() for _ in range(engines)]

    def choose(self, request: Request, fleet: Fleet) -> int:
        loads = [engine.running + engine.waiting for engine in fleet.engines]
        low, high = min(loads), max(loads)
        if high - low > self.balance_abs_threshold and high > self.balance_rel_threshold * low:
            chosen = loads.index(low)
        else:
            matches = [
                prefix_length(tree, request.chain, request.prompt_blocks) for tree in self._trees
            ]
            best = max(matches)
            if best / request.prompt_blocks > self.cache_threshold:
                chosen = matches.index(best)
            else:
                sizes = [len(tree) for tree in self._trees]
                chosen = sizes.index(min(sizes))
        self._trees[chosen].update(request.chain[: request.prompt_blocks])
        return chosen


class PrefixAware:
    name, uses_cluster = "prefixaware", False

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._trie: dict[int, int] = {}  # chunk (its last block's id) -> bitmask of engines

    def choose(self, request: Request, fleet: Fleet) -> int:
        everyone = (1 << len(fleet.engines)) - 1
        selected = everyone
        chunk_ends = range(TEXT_CHUNK_BLOCKS, request.prompt_blocks + 1, TEXT_CHUNK_BLOCKS)
        for end in chunk_ends:
            holders = self._trie.get(request.chain[end - 1], 0) & selected
            if not holders:
                break
            selected = holders
        chosen = self._rng.choice([e for e in range(len(fleet.engines)) if selected >> e & 1])
        for end in chunk_ends:
            block = request.chain[end - 1]
            self._trie[block] = self._trie.get(block, 0) | 1 << chosen
        return chosen


def min_max(values: list[float], present: list[bool] | None = None) -> list[float]:
    """llm-d's normalization: (v - min) / (max - min) over the present values, 1.0 for all when
    they are equal, 0.0 for the absent ones."""
    present = present or [True] * len(values)
    seen = [v for v, p in zip(values, present) if p]
    if not seen:
        return [0.0] * len(values)
    low, high = min(seen), max(seen)
    return [
        (1.0 if high == low else (v - low) / (high - low)) if p else 0.0
        for v, p in zip(values, present)
    ]


class LlmdPrecise:
    name, uses_cluster = "llm-d", False
    prefix_weight, kv_usage_weight, queue_weight = 2.0, 1.0, 1.0

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: Request, fleet: Fleet) -> int:
        engines = fleet.engines
        matches = [engine.gpu_prefix(request) for engine in engines]
        prefix = min_max([float(m) for m in matches], [m > 0 for m in matches])
        queue = min_max([-float(engine.waiting) for engine in engines])
        capacity = engines[0].model.cache_blocks
        kv_free = [1.0 - min(1.0, engine.active_blocks / capacity) for engine in engines]
        scores = [
            self.prefix_weight * p + self.kv_usage_weight * k + self.queue_weight * q
            for p, k, q in zip(prefix, kv_free, queue)
        ]
        best = max(scores)
        return self._rng.choice([e for e, score in enumerate(scores) if score == best])


class KVCacheScore:
    """kvcache's router: `rank_engines` over what its prefix index and the cluster report."""

    def __init__(self, settings: ScoreSettings, uses_cluster: bool, name: str) -> None:
        self.settings, self.uses_cluster, self.name = settings, uses_cluster, name

    def choose(self, request: Request, fleet: Fleet) -> int:
        prompt = request.chain[: request.prompt_blocks]
        stored = fleet.cluster.stored_prefix(prompt, len(prompt)) if fleet.cluster else 0
        states = [
            EngineState(
                name=str(e),
                gpu_tokens=engine.expected_prefix(request) * BLOCK_TOKENS,
                cluster_tokens=stored * BLOCK_TOKENS,
                running=engine.running,
                waiting=engine.waiting,
                in_flight=engine.running + engine.waiting,
                awaiting_first_token=engine.waiting + (engine.busy_until is not None),
                cached_blocks=len(engine.cache),
            )
            for e, engine in enumerate(fleet.engines)
        ]
        key = affinity_block(prompt, BLOCK_TOKENS, self.settings)
        ranking = rank_engines(RouteRequest(request.prompt_tokens, key), states, self.settings)
        return int(ranking[0].name)


class Oracle:
    name, uses_cluster = "oracle", True

    def choose(self, request: Request, fleet: Fleet) -> int:
        def ttft(e: int) -> tuple[float, int, int]:
            engine = fleet.engines[e]
            wait = engine.backlog_s(fleet.now)
            return wait + engine.expected_service_s(request, fleet.cluster), engine.waiting, e

        return min(range(len(fleet.engines)), key=ttft)


def policies(seed: int, engines: int) -> list[Policy]:
    """Every policy compared, fresh, the oracle first (the others are reported against it)."""
    return [
        Oracle(),
        RoundRobin(),
        LeastLoad(seed),
        SessionAffinity(engines),
        SGLangCacheAware(engines),
        PrefixAware(seed),
        LlmdPrecise(seed),
        KVCacheScore(ScoreSettings(), uses_cluster=False, name="kvcache-gpu"),
        KVCacheScore(ScoreSettings(), uses_cluster=True, name="kvcache"),
    ]


# ------------------------------------------------------------------------------------ simulation


@dataclass(frozen=True)
class RunResult:
    trace: str
    engines: int
    policy: str
    reused_tokens: int
    gpu_hit_tokens: int
    prompt_tokens: int
    mean_ttft_s: float
    p90_ttft_s: float
    p99_ttft_s: float
    max_mean_load: float


ARRIVE, PREFILLED, FINISHED = 0, 1, 2


def simulate(
    trace_name: str,
    requests: Sequence[Request],
    policy: Policy,
    engines: int,
    model: EngineModel = EngineModel(),
) -> RunResult:
    """Serve `requests` on `engines` fresh engines, routed by `policy`."""
    fleet = Fleet(
        [Engine(model) for _ in range(engines)],
        Cluster(model.cluster_chunk_blocks) if policy.uses_cluster else None,
    )
    events: list[tuple[float, int, int, int, Request]] = [
        (request.arrival_s, i, ARRIVE, -1, request) for i, request in enumerate(requests)
    ]
    heapq.heapify(events)
    order = itertools.count(len(events))
    ttfts: list[float] = []
    gpu_hits = loaded = 0

    def start(e: int, now: float) -> None:
        nonlocal gpu_hits, loaded
        request, service, gpu, fetched = fleet.engines[e].start(now, fleet.cluster)
        gpu_hits += gpu
        loaded += fetched
        heapq.heappush(events, (now + service, next(order), PREFILLED, e, request))

    while events:
        now, _, kind, e, request = heapq.heappop(events)
        fleet.now = now
        if kind == ARRIVE:
            e = policy.choose(request, fleet)
            engine = fleet.engines[e]
            engine.enqueue(request, fleet.cluster)
            if engine.busy_until is None:
                start(e, now)
        elif kind == PREFILLED:
            engine = fleet.engines[e]
            ttfts.append(now - request.arrival_s)
            engine.prefilled(request)
            if fleet.cluster:
                fleet.cluster.store(request.chain, request.prompt_blocks)
            decode = request.answer_blocks * BLOCK_TOKENS * model.decode_s_per_token
            heapq.heappush(events, (now + decode, next(order), FINISHED, e, request))
            if engine.queue:
                start(e, now)
        else:
            fleet.engines[e].finished(request)
    served = [engine.served for engine in fleet.engines]
    latencies = np.array(ttfts)
    return RunResult(
        trace=trace_name,
        engines=engines,
        policy=policy.name,
        reused_tokens=(gpu_hits + loaded) * BLOCK_TOKENS,
        gpu_hit_tokens=gpu_hits * BLOCK_TOKENS,
        prompt_tokens=sum(r.prompt_tokens for r in requests),
        mean_ttft_s=float(latencies.mean()),
        p90_ttft_s=float(np.percentile(latencies, 90)),
        p99_ttft_s=float(np.percentile(latencies, 99)),
        max_mean_load=max(served) / (sum(served) / len(served)),
    )


def compare(
    trace_name: str,
    requests: Sequence[Request],
    engines: int,
    model: EngineModel,
    seed: int,
) -> list[RunResult]:
    """Every policy on the same requests and fleet, the oracle first."""
    return [
        simulate(trace_name, requests, policy, engines, model) for policy in policies(seed, engines)
    ]


# --------------------------------------------------------------------------------------- reports


def record(result: RunResult, oracle: RunResult) -> dict:
    return {
        "trace": result.trace,
        "engines": result.engines,
        "policy": result.policy,
        "reused_tokens": result.reused_tokens,
        "oracle_tokens": oracle.reused_tokens,
        "mean_ttft_s": round(result.mean_ttft_s, 4),
        "p99_ttft_s": round(result.p99_ttft_s, 4),
        "max_mean_load": round(result.max_mean_load, 3),
        # essential to read reused_tokens: the part served from the engine's own GPU cache
        "gpu_hit_tokens": result.gpu_hit_tokens,
    }


def print_table(results: list[RunResult]) -> None:
    header = (
        f"{'trace':<13} {'eng':>3} {'policy':<12} {'reused/prompt':>13} {'gpu/prompt':>10} "
        f"{'vs oracle':>9} {'mean s':>8} {'p90 s':>8} {'p99 s':>8} {'max/mean':>8}"
    )
    print(header)
    print("-" * len(header))
    oracle_tokens = {(r.trace, r.engines): r.reused_tokens for r in results if r.policy == "oracle"}
    for r in results:
        print(
            f"{r.trace:<13} {r.engines:>3} {r.policy:<12} "
            f"{r.reused_tokens / r.prompt_tokens:>13.3f} "
            f"{r.gpu_hit_tokens / r.prompt_tokens:>10.3f} "
            f"{r.reused_tokens / oracle_tokens[(r.trace, r.engines)]:>9.3f} "
            f"{r.mean_ttft_s:>8.3f} {r.p90_ttft_s:>8.3f} {r.p99_ttft_s:>8.3f} "
            f"{r.max_mean_load:>8.3f}"
        )


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys((r.trace, r.engines) for r in results))
    names = list(dict.fromkeys(r.policy for r in results))
    by_key = {(r.trace, r.engines, r.policy): r for r in results}
    figure, (ttft_axis, reuse_axis) = plt.subplots(2, 1, figsize=(13, 8), sharex=True)
    width = 0.8 / len(names)
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(runs))]
        picked = [by_key[(trace, engines, name)] for trace, engines in runs]
        oracle = [by_key[(trace, engines, "oracle")] for trace, engines in runs]
        ttft_axis.bar(xs, [r.mean_ttft_s for r in picked], width, label=name, color=colors(i))
        reuse_axis.bar(
            xs,
            [r.reused_tokens / o.reused_tokens for r, o in zip(picked, oracle)],
            width,
            color=colors(i),
        )
    ttft_axis.set_yscale("log")
    ttft_axis.set_ylabel("mean TTFT (s, log)")
    figure.legend(*ttft_axis.get_legend_handles_labels(), loc="lower center", ncol=len(names))
    reuse_axis.set_ylabel("reused tokens / oracle's")
    reuse_axis.set_xticks(
        range(len(runs)), [f"{trace}, {engines} engines" for trace, engines in runs]
    )
    figure.suptitle("Routing policies on simulated fleets (benchmarks/routing.py)")
    figure.tight_layout(rect=(0, 0.05, 1, 1))
    figure.savefig(path, dpi=110)


SWEEP: list[tuple[str, object]] = [
    ("queued_s_per_request", (0.025, 0.05, 0.1, 0.2)),
    ("running_s_per_request", (0.0, 0.005, 0.02)),
    ("min_match_tokens", (0, 512, 2048)),
    ("imbalance_ratio", (1.5, 100.0)),
    ("imbalance_slack", (4.0, 1e9)),
]


def sweep(seed: int) -> None:
    """kvcache's policy with each setting moved alone from its default, on the 8-engine runs:
    mean TTFT / p99 TTFT / max-over-mean load per trace (the defaults won on the three together,
    chat first)."""
    base = ScoreSettings()
    candidates = [("defaults", base)] + [
        (f"{name}={value}", replace(base, **{name: value}))
        for name, values in SWEEP
        for value in values
    ]
    runs = [(name, TRACES[name](seed), model) for name, engines, model in RUNS if engines == 8]
    print(f"{'settings':<30}" + "".join(f"{name:>24}" for name, _, _ in runs))
    for label, settings in candidates:
        policy = KVCacheScore(settings, uses_cluster=True, name="kvcache")
        cells = []
        for name, requests, model in runs:
            r = simulate(name, requests, policy, 8, model)
            cells.append(f"{r.mean_ttft_s:.3f}/{r.p99_ttft_s:.2f}/{r.max_mean_load:.2f}")
        print(f"{label:<30}" + "".join(f"{cell:>24}" for cell in cells), flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/routing.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/routing.png"))
    parser.add_argument("--sweep", action="store_true", help="compare ScoreSettings candidates")
    args = parser.parse_args(argv)
    if args.sweep:
        sweep(args.seed)
        return
    began = time.process_time()
    results: list[RunResult] = []
    for name, engines, model in RUNS:
        results.extend(compare(name, TRACES[name](args.seed), engines, model, args.seed))
        print(
            f"{name}, {engines} engines: {time.process_time() - began:.0f} s CPU", file=sys.stderr
        )
    print_table(results)
    oracles = {(r.trace, r.engines): r for r in results if r.policy == "oracle"}
    args.out.write_text(
        json.dumps([record(r, oracles[(r.trace, r.engines)]) for r in results], indent=1) + "\n"
    )
    plot(results, args.plot)
    print(f"{time.process_time() - began:.0f} s CPU; wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
