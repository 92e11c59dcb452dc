"""The routing policy: which engine serves a request, as a pure function of what the router knows.

For each healthy engine the router knows how much of the request's prefix its GPU holds (the
prefix index), how much it could load from the cache cluster instead, and how busy it is. The
cost of an engine estimates the request's time to first token there:

    cost = queued * queued_s_per_request               (the prefills ahead of it)
         + load * running_s_per_request               (the batch it joins)
         + (prompt - covered) * prefill_s_per_token   (prefilling what neither GPU nor cluster has)
         + (covered - gpu) * load_s_per_token          (loading the rest of the prefix)

with `covered = max(gpu, cluster)`. Queued requests (no first token yet) weigh more than the
others because their prefills come before the new one's; a decoding request shares the GPU's
steps but adds little to a prefill. The cheapest engine wins, subject to two guards:
- a GPU match shorter than `min_match_tokens` counts as none, so a short prefix that every
  request shares (a system prompt, a chat template) is no reason to prefer an engine;
- an engine whose load exceeds `imbalance_ratio` x the least loaded engine's plus
  `imbalance_slack` ranks after every other, so one shared prefix cannot pin all traffic to the
  pods that hold it (vLLM production-stack #957/#990), and an idle engine is put to work even
  when it must first load a long shared prefix.
Ties go to the least loaded engine, then to the one with the smallest prefix index (the most room
for a new prefix, as in SGLang), then to a rendezvous hash of the request's affinity block and
the engine's name: new prefixes spread over idle engines and each keeps its engine, whatever
order the engines are listed in (ties to the first engine sent all 8 prompt groups of the proxy
benchmark to one engine under both Rust routers).

The live router and `benchmarks/routing.py` both call `rank_engines`. No I/O here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

BlockHash = TypeVar("BlockHash")
_LOW_64 = (1 << 64) - 1


@dataclass(frozen=True)
class ScoreSettings:
    """The policy's weights. The costs per token are the simulated engine's of
    `benchmarks/routing.py` (calibrate them per model and network: prefill from the engine's
    prefill throughput, load from `benchmarks/ttft.py`). The others won its `--sweep` (each moved
    alone; chat, rag and agent traces on 8 engines, seeds 1-3; `docs/routing.png`): on chat they
    give 0.146 s mean TTFT, against 0.147 s for the greedy oracle and 0.177 s for the best peer,
    at 1.02 max/mean load.
    - queued 0.075 s, under a typical prefill (0.1 s on chat): a conversation waits out a short
      queue rather than move, since a move copies its prefix into a second engine's cache (0.2 s:
      0.183 s on chat; summing the queued prefills' estimated times instead: 0.18 s or worse).
    - running 0.01 s: 0 is 2% faster on chat, in a simulator where decoding never slows a
      prefill, but spreads rag worse (max/mean 1.2-1.26 against 1.06-1.14).
    - min match 768 tokens: 512-1024 are alike within 2% (2048 drops chat's affinity: 0.180 s);
      768 is above chat's 512-token system prompt and below the ~1K-token prompt groups of the
      proxy benchmark, which must keep their engines.
    - guard 2x the least load + 8: without it agent's 6K-token shared prompt leaves engines idle
      (0.292 s, max/mean 1.37, against 0.261 s and 1.03).
    """

    prefill_s_per_token: float = 4e-4  # engine time to prefill one token the request lacks
    load_s_per_token: float = 4e-5  # engine time to load one token from the cache cluster
    queued_s_per_request: float = 0.075  # per request ahead with no first token yet
    running_s_per_request: float = 0.01  # per request on the engine, decoding or not
    min_match_tokens: int = 768  # a shorter GPU match counts as none
    imbalance_ratio: float = 2.0  # load above ratio x the least load + slack ranks last
    imbalance_slack: float = 8.0


@dataclass(frozen=True)
class EngineState:
    """One engine as the router sees it for one request."""

    name: str
    gpu_tokens: int = 0  # the request's prefix on the engine's GPU (prefix index)
    cluster_tokens: int = 0  # the request's prefix the engine could load from the cache cluster
    running: float = 0.0  # vLLM's num_requests_running, last scrape
    waiting: float = 0.0  # vLLM's num_requests_waiting, last scrape
    in_flight: int = 0  # requests this router sent that have not finished
    awaiting_first_token: int = 0  # of those, the ones with no first token yet
    cached_blocks: int = 0  # size of the engine's prefix index
    healthy: bool = True

    @property
    def load(self) -> float:
        """The larger of the engine's gauges (which count other routers' requests too) and the
        router's own count (which moves before the next scrape)."""
        return max(float(self.in_flight), self.running + self.waiting)

    @property
    def queued(self) -> float:
        """Requests whose prefill comes before a new one's: the router's own without a first
        token (waiting or prefilling, known at once), or the waiting gauge when larger (other
        routers' requests)."""
        return max(float(self.awaiting_first_token), self.waiting)


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int
    affinity_key: int  # `affinity_block` of the request's block hashes


@dataclass(frozen=True)
class Candidate:
    name: str
    cost_s: float
    balanced: bool  # False: past the imbalance guard, ranked after every balanced engine


def affinity_block(
    block_hashes: Sequence[BlockHash], block_tokens: int, settings: ScoreSettings
) -> BlockHash:
    """The hash of the block that ends the prompt's first `min_match_tokens` (the last block of a
    shorter prompt): the shortest prefix that counts as affinity. Requests that share it tie the
    same way; groups behind one common system prompt or chat template still spread."""
    if not block_hashes:
        raise ValueError("a request needs at least one full block to be routed by prefix")
    blocks = -(-settings.min_match_tokens // block_tokens)
    return block_hashes[max(0, min(blocks, len(block_hashes)) - 1)]


def estimate_cost(request: RouteRequest, engine: EngineState, settings: ScoreSettings) -> float:
    """The request's estimated time to first token on `engine`, in seconds."""
    prompt = request.prompt_tokens
    gpu = min(engine.gpu_tokens, prompt)
    if gpu < settings.min_match_tokens:
        gpu = 0
    covered = max(gpu, min(engine.cluster_tokens, prompt))
    return (
        engine.queued * settings.queued_s_per_request
        + engine.load * settings.running_s_per_request
        + (prompt - covered) * settings.prefill_s_per_token
        + (covered - gpu) * settings.load_s_per_token
    )


def rank_engines(
    request: RouteRequest, engines: Sequence[EngineState], settings: ScoreSettings = ScoreSettings()
) -> list[Candidate]:
    """The healthy engines, best first: the first serves the request, the next ones take its
    retries. Unhealthy engines are left out."""
    healthy = [engine for engine in engines if engine.healthy]
    if not healthy:
        return []
    ceiling = min(engine.load for engine in healthy) * settings.imbalance_ratio
    ceiling += settings.imbalance_slack
    key = (request.affinity_key & _LOW_64).to_bytes(8, "little")
    ranked = []
    for engine in healthy:
        candidate = Candidate(
            engine.name, estimate_cost(request, engine, settings), engine.load <= ceiling
        )
        rendezvous = hashlib.blake2b(key + engine.name.encode(), digest_size=8).digest()
        # costs are rounded to a microsecond, so equal inputs tie however the sum was reached
        order = (
            not candidate.balanced,
            round(candidate.cost_s, 6),
            engine.load,
            engine.cached_blocks,
            rendezvous,
        )
        ranked.append((order, candidate))
    ranked.sort(key=lambda pair: pair[0])
    return [candidate for _, candidate in ranked]


def choose_engine(
    request: RouteRequest, engines: Sequence[EngineState], settings: ScoreSettings = ScoreSettings()
) -> str | None:
    """The engine to send the request to; None when no engine is healthy."""
    ranking = rank_engines(request, engines, settings)
    return ranking[0].name if ranking else None
