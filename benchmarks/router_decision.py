"""The router's prefix lookup: `PrefixIndex.match` for 4K-token requests against 100k indexed
blocks over 64 engines, and hashing a 4K-token prompt the way vLLM does.

    python benchmarks/router_decision.py [--engines 64] [--blocks 100000] [--tokens 4096]
                                         [--block-sizes 16,128] [--requests 20000] [--seed 1]
                                         [--out benchmarks/results/router_decision.json]

The fleet is filled through `PrefixIndex.apply` with `BlockStored` batches, as the engines' KV
events would: 8 system prompts (a quarter of the request) that every engine holds, then
conversations, each a 4K-token chain that starts with one of the system prompts and is held by one
engine, until the index holds `--blocks` entries. Each timed request is one of those
conversations, so `match` walks all of its blocks, with every engine alive through the system
prompt: the longest walk a 4K-token request can cost. A miss costs one dict lookup. Hashing times
`block_hashes` (SHA-256 over CBOR, as vLLM with `sha256_cbor`) on a 4K-token prompt.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvcache.router.block_hash import block_hashes
from kvcache.router.kv_events import BlockStored, EventBatch
from kvcache.router.prefix_index import PrefixIndex

SYSTEM_PROMPTS = 8


def chain(rng: random.Random, blocks: int) -> list[int]:
    """A request's block hashes; random 64-bit values are all the index sees of real ones."""
    return [rng.getrandbits(64) for _ in range(blocks)]


def fill(
    index: PrefixIndex, engines: list[str], target: int, request_blocks: int, rng: random.Random
) -> tuple[list[list[int]], float]:
    """Stores system prompts everywhere, then conversations round-robin until `target` entries;
    returns the conversations (as whole requests) and the time `apply` took per block."""
    system_blocks = request_blocks // 4
    prompts = [chain(rng, system_blocks) for _ in range(SYSTEM_PROMPTS)]
    conversations: list[list[int]] = []
    applied, elapsed = 0, 0.0

    def store(engine: str, hashes: list[int]) -> None:
        nonlocal applied, elapsed
        event = BlockStored(tuple(hashes), None, (), 16, medium="GPU")
        start = time.perf_counter()
        index.apply(engine, EventBatch(0, 0.0, (event,)))
        elapsed += time.perf_counter() - start
        applied += len(hashes)

    for engine in engines:
        for prompt in prompts:
            store(engine, prompt)
    while applied < target:
        engine = engines[len(conversations) % len(engines)]
        request = rng.choice(prompts) + chain(rng, request_blocks - system_blocks)
        store(engine, request[system_blocks:])
        conversations.append(request)
    return conversations, elapsed / applied


def percentiles_us(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered) / 1000, p99 / 1000


def timed(call: Callable[[Any], object], inputs: list[Any]) -> list[int]:
    """Nanoseconds of `call(x)` for each input."""
    gc.collect()
    samples = []
    for value in inputs:
        start = time.perf_counter_ns()
        call(value)
        samples.append(time.perf_counter_ns() - start)
    return samples


def run(args: argparse.Namespace) -> dict:
    engines = [f"engine-{i}" for i in range(args.engines)]
    cases = []
    for block_size in args.block_sizes:
        rng = random.Random(args.seed)
        request_blocks = args.tokens // block_size
        index = PrefixIndex(default_capacity_blocks=args.blocks)
        conversations, apply_s = fill(index, engines, args.blocks, request_blocks, rng)
        indexed = sum(index.blocks(engine) for engine in engines)
        samples = timed(index.match, rng.choices(conversations, k=args.requests))
        matched = index.match(conversations[0])
        assert max(matched.values()) == request_blocks and len(matched) == args.engines
        miss = chain(rng, request_blocks)
        p50, p99 = percentiles_us(samples)
        miss_p50, miss_p99 = percentiles_us(timed(index.match, [miss] * args.requests))
        cases.append(
            {
                "block_size": block_size,
                "request_blocks": request_blocks,
                "indexed_blocks": indexed,
                "match_p50_us": round(p50, 2),
                "match_p99_us": round(p99, 2),
                "miss_p50_us": round(miss_p50, 2),
                "miss_p99_us": round(miss_p99, 2),
                "apply_us_per_block": round(apply_s * 1e6, 3),
            }
        )
    tokens = [random.Random(args.seed).randrange(128_000) for _ in range(args.tokens)]
    hash_cases = []
    for block_size in args.block_sizes:
        hash_prompt = functools.partial(block_hashes, block_size=block_size, hash_seed="0")
        samples = timed(hash_prompt, [tokens] * args.hash_repeats)
        p50, p99 = percentiles_us(samples)
        hash_cases.append(
            {"block_size": block_size, "p50_us": round(p50, 1), "p99_us": round(p99, 1)}
        )
    return {
        "router": "kvcache",
        "decision_p99_us": max(case["match_p99_us"] for case in cases),
        "indexed_blocks": min(case["indexed_blocks"] for case in cases),
        "engines": args.engines,
        "request_tokens": args.tokens,
        "hash_p99_us": max(case["p99_us"] for case in hash_cases),
        "decision": "PrefixIndex.match only (scoring is measured with the score module)",
        "cases": cases,
        "hash_cases": hash_cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=100_000, help="indexed entries in all")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per request")
    parser.add_argument(
        "--block-sizes", type=lambda text: [int(x) for x in text.split(",")], default=[16, 128]
    )
    parser.add_argument("--requests", type=int, default=20_000, help="timed matches per case")
    parser.add_argument("--hash-repeats", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/router_decision.json")
    args = parser.parse_args()
    result = run(args)
    print(
        f"{args.engines} engines, {result['indexed_blocks']} indexed blocks, "
        f"{args.tokens}-token requests"
    )
    print(
        f"{'block size':>10} {'blocks':>6} {'match p50 µs':>13} {'p99 µs':>8} "
        f"{'miss p99 µs':>12} {'hash p50 µs':>12} {'p99 µs':>8}"
    )
    for case, hashing in zip(result["cases"], result["hash_cases"]):
        print(
            f"{case['block_size']:>10} {case['request_blocks']:>6} {case['match_p50_us']:>13} "
            f"{case['match_p99_us']:>8} {case['miss_p99_us']:>12} {hashing['p50_us']:>12} "
            f"{hashing['p99_us']:>8}"
        )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
