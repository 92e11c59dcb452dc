"""Greedy agreement on the demo's prompts: how many of 64 generated tokens stay the same when a
prompt's cached prefix comes back through each codec instead of being prefilled.

For every request of `kvcache up`'s workloads (the chat turns, with the model's own replies, and
the RAG questions) on the real SmolLM2-135M-Instruct: greedy tokens after full prefill are the
reference; then, per codec, the prompt's full chunks are stored through a connector (local tier
only: the bytes are the same wherever they live) and the prompt is generated again from the loaded
prefix. Agreement is the share of the 64 positions with the reference's token (free running: after
a first difference the continuations usually part); `first_difference` is where they part.

    .venv/bin/python benchmarks/agreement.py [--tokens 64] [--codecs none,int8,cachegen]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kvcache.connector import smollm2
from kvcache.connector.core import Connector, ConnectorConfig
from kvcache.connector.hf import generate
from kvcache.core.keys import Namespace
from kvcache.demo import workload
from kvcache.kernels import codec_by_name


def first_difference(tokens: list[int], reference: list[int]) -> int:
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--codecs", default="none,int8,cachegen")
    parser.add_argument("--out", default="benchmarks/results/agreement.json")
    args = parser.parse_args()
    codecs = args.codecs.split(",")
    tokenizer, model = smollm2.load()
    rows = []
    plan = workload.requests(tokenizer)
    request = next(plan)
    while True:
        started = time.perf_counter()
        with torch.inference_mode():
            kv = smollm2.kv_of(model(torch.tensor([request.prompt])).past_key_values)
        reference = generate(model, None, request.prompt, args.tokens).tokens
        row = {"workload": request.workload, "request": request.label,
               "prompt_tokens": len(request.prompt)}  # fmt: skip
        for name in codecs:
            namespace = Namespace(model=smollm2.MODEL_NAME, kv_dtype="float32")
            connector = Connector(ConnectorConfig(namespace), codec_by_name(name), None)
            try:
                connector.store(request.prompt, kv)
                connector.store_worker.drain(60)
                served = generate(model, connector, request.prompt, args.tokens, store=False)
            finally:
                connector.close()
            same = sum(a == b for a, b in zip(served.tokens, reference))
            row[name] = {
                "cached_tokens": served.cached_tokens,
                "agreement": same / args.tokens,
                "first_difference": first_difference(served.tokens, reference),
            }
        rows.append(row)
        print(
            f"{request.workload:4} {request.label:15} {len(request.prompt):5} tokens  "
            + "  ".join(
                f"{name} {row[name]['agreement']:.2f} (from {row[name]['first_difference']})"
                for name in codecs
            )
            + f"  [{time.perf_counter() - started:.0f} s]",
            flush=True,
        )
        try:
            request = plan.send(workload.reply_text(tokenizer, reference))
        except StopIteration:
            break
    summary = {}
    for name in codecs:
        hit_rows = [row for row in rows if row[name]["cached_tokens"]]
        summary[name] = {
            "mean_agreement": sum(row[name]["agreement"] for row in hit_rows) / len(hit_rows),
            "requests_identical": sum(row[name]["agreement"] == 1.0 for row in hit_rows),
            "requests_with_hits": len(hit_rows),
        }
    print()
    for name, figures in summary.items():
        print(
            f"{name:8} mean agreement {figures['mean_agreement']:.3f} over "
            f"{figures['requests_with_hits']} requests with a cached prefix; "
            f"{figures['requests_identical']} identical"
        )
    result = {"model": smollm2.MODEL_NAME, "tokens": args.tokens, "summary": summary,
              "requests": rows, "machine": platform.processor() or platform.machine()}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
