"""Time to first token on the real model: full prefill against a prefix loaded from the cluster.

    python benchmarks/ttft.py [--prefix-tokens 2048] [--runs 5] [--out benchmarks/results/ttft.json]

SmolLM2-135M-Instruct (`kvcache.connector.smollm2`, float32, this CPU) answers a prompt made of
a `--prefix-tokens` document prefix (the codec evaluation passages) and a short question, through
the transformers adapter (`kvcache.connector.hf.generate`), with 3 real node processes as the
cluster. The KV is stored as fp16. After one warm-up prefill, each figure is the median of
`--runs` runs (full and cold interleaved):
- full: no connector, the whole prompt prefilled;
- cold: a connector over a cluster that has nothing for this prompt (a fresh tenant salt per
  run), so it pays the lookup and queues the store; `cold_overhead_pct` against full;
- cached: the prefix was stored by another engine's connector; this engine's local tier is
  empty (budget 0), so every byte comes over the network; with codec `none`, with the
  connector's default compressed codec (`int8`, `speedup_compressed`), and with `cachegen`;
- local: the same prefix from the engine's own local tier (no network), codec `none`.
Prints a table and writes the issue's fields (plus per-codec detail) to the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import count
from pathlib import Path

import torch

from kvcache.cachenode.launcher import LocalCluster
from kvcache.client.cluster import ClusterClient
from kvcache.connector import smollm2
from kvcache.connector.core import DEFAULT_CODEC, Connector, ConnectorConfig
from kvcache.connector.hf import generate
from kvcache.core.keys import Namespace
from kvcache.kernels import codec_by_name
from kvcache.kernels.cachegen import CacheGenCodec
from kvcache.kernels.codec import Codec
from kvcache.kernels.raw import RawCodec

TEXTS = Path(__file__).parent / "data" / "codec_eval"
QUESTION = "\n\nQuestion: what is the main point of the last passage? Answer:"
MODEL = "SmolLM2-135M-Instruct"
_tenants = count()
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:5.0f} s] {message}", file=sys.stderr, flush=True)


def make_connector(cluster: LocalCluster, codec: Codec, tenant: bytes, local_bytes: int):
    namespace = Namespace(model=MODEL, kv_dtype="float16", tenant_salt=tenant)
    config = ConnectorConfig(namespace, local_bytes=local_bytes)
    return Connector(config, codec, lambda: ClusterClient(cluster.members))


def ttft(model, connector, prompt: list[int]) -> tuple[float, int]:
    result = generate(model, connector, prompt, 1)
    return result.ttft_s, result.cached_tokens


def cached_runs(model, cluster, codec, prompt, runs: int) -> dict:
    """Store the prompt's prefix through one connector, then time engines whose local tier is
    empty (every byte over the network)."""
    tenant = f"cached-{next(_tenants)}".encode()
    writer = make_connector(cluster, codec, tenant, local_bytes=0)
    try:
        generate(model, writer, prompt, 1)
        writer.store_worker.drain(120)
        stored = writer.store_worker.stats
    finally:
        writer.close()
    times, loaded_bytes, cached = [], 0, 0
    for _ in range(runs):
        reader = make_connector(cluster, codec, tenant, local_bytes=0)
        try:
            seconds, cached = ttft(model, reader, prompt)
            times.append(seconds)
            loaded_bytes = reader.stats.bytes_loaded_cluster
        finally:
            reader.close()
    return {
        "ttft_s": statistics.median(times),
        "cached_tokens": cached,
        "bytes_over_network": loaded_bytes,
        "bytes_stored": stored.bytes_stored,
        "runs_s": [round(t, 4) for t in times],
    }


def local_runs(model, cluster, prompt: list[int], runs: int) -> float:
    """The same engine asks again: its local tier answers."""
    tenant = f"local-{next(_tenants)}".encode()
    engine = make_connector(cluster, RawCodec(), tenant, local_bytes=1 << 30)
    try:
        generate(model, engine, prompt, 1)
        engine.store_worker.drain(120)
        times = []
        for _ in range(runs):
            seconds, cached = ttft(model, engine, prompt)
            times.append(seconds)
        if engine.stats.bytes_loaded_cluster:
            raise RuntimeError("the local-tier runs read from the cluster")
    finally:
        engine.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-tokens", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/ttft.json")
    args = parser.parse_args()
    log("loading SmolLM2-135M-Instruct")
    tokenizer, model = smollm2.load()
    document = "\n\n".join(path.read_text() for path in sorted(TEXTS.glob("*.txt")))
    prefix = tokenizer(document).input_ids[: args.prefix_tokens]
    prompt = prefix + tokenizer(QUESTION).input_ids
    log(f"prompt of {len(prompt)} tokens; starting 3 nodes")
    with LocalCluster.start(3, 1 << 30) as cluster, torch.inference_mode():
        ttft(model, None, prompt)  # warm-up: the first long forward pays one-off costs
        full, cold = [], []
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            full.append(ttft(model, None, prompt)[0])
            tenant = f"cold-{next(_tenants)}".encode()
            connector = make_connector(cluster, RawCodec(), tenant, local_bytes=1 << 30)
            try:
                cold.append(ttft(model, connector, prompt)[0])
                connector.store_worker.drain(120)
            finally:
                connector.close()
        log(f"full {statistics.median(full):.3f} s, cold {statistics.median(cold):.3f} s")
        raw = cached_runs(model, cluster, RawCodec(), prompt, args.runs)
        log(f"cached (none) {raw['ttft_s']:.3f} s")
        compressed = cached_runs(model, cluster, codec_by_name(DEFAULT_CODEC), prompt, args.runs)
        log(f"cached ({DEFAULT_CODEC}) {compressed['ttft_s']:.3f} s")
        cachegen = cached_runs(model, cluster, CacheGenCodec(), prompt, args.runs)
        log(f"cached (cachegen) {cachegen['ttft_s']:.3f} s")
        local = local_runs(model, cluster, prompt, args.runs)
        log(f"local {local:.3f} s")
    ttft_full, ttft_cold = statistics.median(full), statistics.median(cold)
    result = {
        "model": MODEL,
        "prefix_tokens": raw["cached_tokens"],
        "ttft_full_s": round(ttft_full, 4),
        "ttft_cached_s": round(raw["ttft_s"], 4),
        "ttft_local_s": round(local, 4),
        "speedup": round(ttft_full / raw["ttft_s"], 2),
        "speedup_compressed": round(ttft_full / compressed["ttft_s"], 2),
        "speedup_cachegen": round(ttft_full / cachegen["ttft_s"], 2),
        "cold_overhead_pct": round(100 * (ttft_cold / ttft_full - 1), 2),
        "prompt_tokens": len(prompt),
        "ttft_cold_s": round(ttft_cold, 4),
        "ttft_cached_compressed_s": round(compressed["ttft_s"], 4),
        "none": raw,
        DEFAULT_CODEC: compressed,
        "cachegen": cachegen,
        "full_runs_s": [round(t, 4) for t in full],
        "cold_runs_s": [round(t, 4) for t in cold],
    }
    speedup_local = f"{ttft_full / local:.1f}x"
    rows = [
        ("full prefill", ttft_full, "", ""),
        ("cold cluster (lookup + async store)", ttft_cold, "",
         f"{result['cold_overhead_pct']:+.1f}%"),
        ("cached, none, over the network", raw["ttft_s"], raw["bytes_over_network"],
         f"{result['speedup']}x"),
        (f"cached, {DEFAULT_CODEC}, over the network", compressed["ttft_s"],
         compressed["bytes_over_network"], f"{result['speedup_compressed']}x"),
        ("cached, cachegen, over the network", cachegen["ttft_s"],
         cachegen["bytes_over_network"], f"{result['speedup_cachegen']}x"),
        ("cached, local tier", local, 0, speedup_local),
    ]  # fmt: skip
    print(f"\n{MODEL}, prompt {len(prompt)} tokens, cached prefix {raw['cached_tokens']} tokens")
    print(f"{'case':40s} {'TTFT s':>8s} {'bytes moved':>12s} {'vs full':>8s}")
    for name, seconds, moved, ratio in rows:
        print(f"{name:40s} {seconds:8.3f} {moved!s:>12s} {ratio:>8s}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
