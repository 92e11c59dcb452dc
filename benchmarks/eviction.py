"""Prefix-aware eviction vs LRU: reused prefix tokens at the same memory budget, real nodes.

    python benchmarks/eviction.py [--nodes 3] [--requests 300] [--budgets 48Mi,96Mi,192Mi]
                                  [--steps 1,8] [--seed 1] [--out benchmarks/results/eviction.json]
    python benchmarks/eviction.py --in-process --depth-weights 1,2,3,4 [...]   # a sweep

The workload is multi-turn chat behind one shared system prompt, served the way an engine uses
the cache: each request cuts its whole prompt into chunk keys, asks `lookup_prefix` how much is
cached, GETs that prefix, and PUTs the chunks it had to compute, with `{"depth": i}` metas.
- A new conversation (a quarter of the requests) is the 4-chunk system prompt plus a distinct
  first message of 8-24 chunks (a pasted document, a long question).
- Every other request is the next turn of an earlier conversation, chosen with a Zipf law over
  how recently each was last served (rank k has weight 1/k): its prompt is everything so far
  plus 1-2 chunks of answer and next message. At 64 chunks (16K tokens) a conversation ends.
- An engine serves `step` requests together: the step's lookups run first, then one GET for
  all their cached prefixes, then one PUT for all their new chunks. Step 1 is an idle engine
  taking one request at a time; step 8 is a busy one.

The request sequence depends only on the seed, never on what the cache holds, so every policy
sees the same requests. For each budget (memory per node, far below the workload's distinct
chunks) and step it starts fresh node processes with `--eviction lru`, then `--eviction prefix`,
and sums the tokens of every request's cached prefix. Prints a table and writes the records read
back by docs/benchmarks.md.

`--in-process` serves the same stream from the node's own MemoryTier and policies in this
process, placed by the same ring, without sockets: the same counts as real nodes (each node
applies its requests in order, and the counts depend on nothing else) in seconds, for sweeping
`PrefixAwarePolicy`'s depth weight, which no node flag exposes. It writes JSON only with --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvcache.cachenode.eviction import EvictionPolicy, LRUPolicy, PrefixAwarePolicy
from kvcache.cachenode.launcher import LocalCluster
from kvcache.cachenode.memory_tier import MemoryTier
from kvcache.client.cluster import ClusterClient
from kvcache.core.config import parse_bytes
from kvcache.core.keys import Namespace, chunk_keys
from kvcache.core.protocol import ValueInfo
from kvcache.core.ring import HashRing, Member

MiB = 1 << 20
CHUNK_TOKENS = 256
VOCABULARY = 49152
# One namespace for every run: the same keys land on the same nodes under every policy.
NAMESPACE = Namespace(model="bench-eviction")


@dataclass(frozen=True)
class ChatWorkload:
    """The shape of the request stream; every count is in chunks of CHUNK_TOKENS tokens."""

    requests: int = 300
    system_chunks: int = 4
    first_message_chunks: tuple[int, int] = (8, 24)  # a new conversation's own tail, min..max
    turn_chunks: tuple[int, int] = (1, 2)  # answer + next message, per later turn
    max_chunks: int = 64  # the context limit (16K tokens): the conversation ends there
    new_share: float = 0.25
    zipf_s: float = 1.0  # revisit weight of the k-th most recently served conversation: k^-s
    seed: int = 1


def request_stream(workload: ChatWorkload) -> list[list[bytes]]:
    """Each request's prompt as chunk keys, in order. Depends only on the workload and seed."""
    rng = random.Random(workload.seed)

    def tokens(chunks: int) -> list[int]:
        return [rng.randrange(VOCABULARY) for _ in range(chunks * CHUNK_TOKENS)]

    system = tokens(workload.system_chunks)
    conversations: list[list[int]] = []
    recent: list[int] = []  # open conversations, most recently served last
    weights = [1 / (rank + 1) ** workload.zipf_s for rank in range(workload.requests)]
    prompts = []
    for _ in range(workload.requests):
        if not recent or rng.random() < workload.new_share:
            index = len(conversations)
            conversations.append(system + tokens(rng.randint(*workload.first_message_chunks)))
        else:
            rank = rng.choices(range(len(recent)), weights[: len(recent)])[0]
            index = recent.pop(len(recent) - 1 - rank)
            conversations[index] += tokens(rng.randint(*workload.turn_chunks))
        chunks = len(conversations[index]) // CHUNK_TOKENS
        if chunks + workload.turn_chunks[1] <= workload.max_chunks:
            recent.append(index)
        prompts.append(chunk_keys(conversations[index], NAMESPACE, CHUNK_TOKENS))
    return prompts


class PrefixCache(Protocol):
    """What an engine needs from the cache: `ClusterClient`, or the in-process model below."""

    def lookup_prefix(self, keys: Sequence[bytes]) -> int: ...

    def get(self, keys: Sequence[bytes]) -> list[Any]: ...

    def put(
        self, keys: Sequence[bytes], values: Sequence[Any], metas: Sequence[dict[str, Any]]
    ) -> list[bool]: ...


class InProcessNodes:
    """The nodes' memory tiers in this process, placed by the same ring as `LocalCluster`'s
    nodes (same node ids), each applying its keys in the order a node receives them."""

    def __init__(self, count: int, memory_bytes: int, policy: Callable[[], EvictionPolicy]):
        self.ring = HashRing([Member(f"node-{i}", f"tcp://127.0.0.1:{i}") for i in range(count)])
        self.tiers = {m.node_id: MemoryTier(memory_bytes, policy()) for m in self.ring.members}

    def _placed(self, keys: Sequence[bytes]) -> list[MemoryTier]:
        tiers: list[MemoryTier] = [self.tiers["node-0"]] * len(keys)
        for node_id, positions in self.ring.group_by_primary(keys).items():
            for position in positions:
                tiers[position] = self.tiers[node_id]
        return tiers

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        placed = self._placed(keys)
        return next((i for i, key in enumerate(keys) if key not in placed[i]), len(keys))

    def get(self, keys: Sequence[bytes]) -> list[Any]:
        return [tier.get(key) for tier, key in zip(self._placed(keys), keys)]

    def put(
        self, keys: Sequence[bytes], values: Sequence[Any], metas: Sequence[dict[str, Any]]
    ) -> list[bool]:
        return [
            tier.put(key, [value], ValueInfo(len(value), 1, 0, meta))
            for tier, key, value, meta in zip(self._placed(keys), keys, values, metas)
        ]

    @property
    def evictions(self) -> int:
        return sum(tier.evictions for tier in self.tiers.values())

    def unreachable_share(self, served: list[list[bytes]]) -> float:
        """The share of cached chunks no lookup can reach: a chunk behind an evicted one."""
        cached = {
            key for keys in served for key, tier in zip(keys, self._placed(keys)) if key in tier
        }
        reachable = set()
        for keys in served:
            for key in keys:
                if key not in cached:
                    break
                reachable.add(key)
        return len(cached - reachable) / max(1, len(cached))


@dataclass
class Tally:
    prompt_chunks: int = 0
    hit_chunks: int = 0
    hit_beyond_system_chunks: int = 0
    get_misses: int = 0
    put_refused: int = 0
    seconds: float = 0.0
    unreachable_share: float | None = None  # in-process only: mean over every 5th step


def serve(
    cache: PrefixCache,
    prompts: list[list[bytes]],
    step: int,
    system_chunks: int,
    value: bytes,
    unreachable_share: Callable[[list[list[bytes]]], float] | None = None,
) -> Tally:
    """Serve the stream as an engine would, `step` requests at a time; count cached prefixes."""
    tally = Tally()
    samples = []
    started = time.perf_counter()
    for first in range(0, len(prompts), step):
        if unreachable_share is not None and first // step % 5 == 0:
            samples.append(unreachable_share(prompts[:first]))
        batch = prompts[first : first + step]
        hits = [cache.lookup_prefix(keys) for keys in batch]
        hit_keys = [key for keys, hit in zip(batch, hits) for key in keys[:hit]]
        if hit_keys:
            # A chunk evicted between lookup and load is recomputed: counted, not hidden.
            tally.get_misses += sum(found is None for found in cache.get(hit_keys))
        new_keys = [key for keys, hit in zip(batch, hits) for key in keys[hit:]]
        metas = [{"depth": d} for keys, hit in zip(batch, hits) for d in range(hit, len(keys))]
        if new_keys:
            tally.put_refused += cache.put(new_keys, [value] * len(new_keys), metas).count(False)
        for keys, hit in zip(batch, hits):
            tally.prompt_chunks += len(keys)
            tally.hit_chunks += hit
            tally.hit_beyond_system_chunks += max(0, hit - system_chunks)
    tally.seconds = time.perf_counter() - started
    if samples:
        tally.unreachable_share = sum(samples) / len(samples)
    return tally


def reusable_chunks(prompts: list[list[bytes]], step: int) -> int:
    """What an unbounded cache would reuse: each request's longest prefix stored by an earlier
    step (a step's lookups all run before its PUTs)."""
    seen: set[bytes] = set()
    reusable = 0
    for first in range(0, len(prompts), step):
        batch = prompts[first : first + step]
        for keys in batch:
            reusable += next((i for i, key in enumerate(keys) if key not in seen), len(keys))
        for keys in batch:
            seen.update(keys)
    return reusable


def run_real(
    policy: str, nodes: int, budget: int, prompts: list[list[bytes]], step: int, value: bytes
) -> tuple[Tally, int]:
    with LocalCluster.start(nodes, budget, extra_args=["--eviction", policy]) as cluster:
        with ClusterClient(cluster.members) as client:
            tally = serve(client, prompts, step, ChatWorkload.system_chunks, value)
            stats = client.node_stats()
    return tally, sum(s["evictions"] for s in stats.values() if s is not None)


def run_in_process(
    policy: str, nodes: int, budget: int, prompts: list[list[bytes]], step: int, value: bytes
) -> tuple[Tally, int]:
    if policy == "lru":
        factory: Callable[[], EvictionPolicy] = LRUPolicy
    else:
        weight = int(policy.removeprefix("prefix(w=").removesuffix(")"))
        factory = lambda: PrefixAwarePolicy(weight)  # noqa: E731
    cache = InProcessNodes(nodes, budget, factory)
    tally = serve(cache, prompts, step, ChatWorkload.system_chunks, value, cache.unreachable_share)
    return tally, cache.evictions


def run(args: argparse.Namespace) -> list[dict]:
    prompts = request_stream(ChatWorkload(requests=args.requests, seed=args.seed))
    distinct = len({key for keys in prompts for key in keys})
    working_set = distinct * args.chunk_bytes
    value = random.Random(args.seed).randbytes(args.chunk_bytes)
    print(
        f"workload: {len(prompts)} requests, {sum(map(len, prompts))} prompt chunks, "
        f"{distinct} distinct ({working_set / MiB:.0f} MiB of {args.chunk_bytes / MiB:.0f} MiB "
        f"chunks); {'in-process model' if args.in_process else 'real node processes'}",
        flush=True,
    )
    if args.in_process:
        policies = ["lru", *(f"prefix(w={weight})" for weight in args.depth_weights)]
        measure = run_in_process
    else:
        policies, measure = ["lru", "prefix"], run_real
    records = []
    for budget in args.budgets:
        for step in args.steps:
            reusable = reusable_chunks(prompts, step)
            for policy in policies:
                tally, evictions = measure(policy, args.nodes, budget, prompts, step, value)
                records.append({
                    "policy": policy,
                    "budget_bytes": budget * args.nodes,
                    "reused_prefix_tokens": tally.hit_chunks * CHUNK_TOKENS,
                    "reused_beyond_system_prompt_tokens":
                        tally.hit_beyond_system_chunks * CHUNK_TOKENS,
                    "unbounded_cache_tokens": reusable * CHUNK_TOKENS,
                    "prompt_tokens": tally.prompt_chunks * CHUNK_TOKENS,
                    "step_requests": step,
                    "nodes": args.nodes,
                    "node_memory_bytes": budget,
                    "working_set_bytes": working_set,
                    "chunk_bytes": args.chunk_bytes,
                    "requests": len(prompts),
                    "evictions": evictions,
                    "get_misses": tally.get_misses,
                    "put_refused": tally.put_refused,
                    "seconds": round(tally.seconds, 2),
                    "seed": args.seed,
                })  # fmt: skip
                if tally.unreachable_share is not None:
                    records[-1]["unreachable_cached_share"] = round(tally.unreachable_share, 4)
                print(
                    f"{policy:12s} budget {budget * args.nodes / MiB:4.0f} MiB step {step}: "
                    f"{tally.hit_chunks * CHUNK_TOKENS} reused prefix tokens "
                    f"({tally.seconds:.1f} s)",
                    flush=True,
                )
    return records


def print_table(records: list[dict]) -> None:
    header = ["budget MiB", "of working set", "step", "policy", "reused tokens", "vs LRU",
              "beyond system prompt", "vs LRU", "unbounded cache", "unreachable"]  # fmt: skip
    rows = []
    lru: dict[tuple[int, int], dict] = {}
    for record in records:
        cell = (record["budget_bytes"], record["step_requests"])
        if record["policy"] == "lru":
            lru[cell] = record
        base = lru[cell]
        total, beyond = record["reused_prefix_tokens"], record["reused_beyond_system_prompt_tokens"]
        rows.append([
            f"{record['budget_bytes'] / MiB:.0f}",
            f"{record['budget_bytes'] / record['working_set_bytes']:.1%}",
            str(record["step_requests"]),
            record["policy"],
            str(total),
            f"{total / max(1, base['reused_prefix_tokens']):.2f}",
            str(beyond),
            f"{beyond / max(1, base['reused_beyond_system_prompt_tokens']):.2f}",
            str(record["unbounded_cache_tokens"]),
            f"{record['unreachable_cached_share']:.0%}" if "unreachable_cached_share" in record
            else "-",
        ])  # fmt: skip
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    print()
    for line in [header, *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def _list(parse: Callable[[str], int]) -> Callable[[str], list[int]]:
    return lambda text: [parse(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument(
        "--budgets", type=_list(parse_bytes), default="48Mi,96Mi,192Mi",
        help="memory per node, comma-separated; each is run with every policy",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=_list(int), default="1,8", help="requests an engine serves together"
    )
    parser.add_argument("--chunk-bytes", type=parse_bytes, default=2 * MiB)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--in-process", action="store_true", help="model the nodes in-process")
    parser.add_argument(
        "--depth-weights", type=_list(int), default="2",
        help="PrefixAwarePolicy depth weights to compare (--in-process only)",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="default: benchmarks/results/eviction.json")
    args = parser.parse_args()
    records = run(args)
    print_table(records)
    out = args.out or (None if args.in_process else "benchmarks/results/eviction.json")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(records, indent=1) + "\n")
        print(f"\nwrote {out}")


if __name__ == "__main__":
    sys.exit(main())
