"""The transformers adapter on the real SmolLM2-135M-Instruct: a prompt whose prefix another
connector stored in the cluster generates the same greedy tokens as full prefill, with logits
within 1e-4 (codec `none`), and loads instead of prefilling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcache.client.cluster import ClusterClient
from kvcache.connector import smollm2
from kvcache.connector.core import Connector, ConnectorConfig
from kvcache.connector.hf import generate
from kvcache.core.keys import Namespace
from kvcache.kernels.cachegen import CacheGenCodec
from kvcache.kernels.raw import RawCodec

TEXTS = Path(__file__).parents[2] / "benchmarks" / "data" / "codec_eval"


@pytest.fixture(scope="module")
def model_and_prompt():
    tokenizer, model = smollm2.load()
    document = (TEXTS / "2_replication.txt").read_text()
    messages = [{"role": "user", "content": f"{document}\n\nSummarize the text in one sentence."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return model, list(ids)


def connector(members, codec, dtype) -> Connector:
    namespace = Namespace(model="SmolLM2-135M-Instruct", kv_dtype=dtype)
    return Connector(ConnectorConfig(namespace), codec, lambda: ClusterClient(members))


def test_a_prefix_from_the_cluster_generates_what_full_prefill_does(
    start_cluster, model_and_prompt
):
    model, prompt = model_and_prompt
    assert len(prompt) > 512  # two full 256-token chunks to load
    cluster = start_cluster(2, memory_bytes=256 << 20)
    full = generate(model, None, prompt, 16)
    first, second = (connector(cluster.members, RawCodec(), "float32") for _ in range(2))
    try:
        cold = generate(model, first, prompt, 16)
        assert cold.cached_tokens == 0 and cold.tokens == full.tokens
        assert first.store_worker.drain(30) and first.store_worker.stats.stored == 2
        warm = generate(model, second, prompt, 16)
        assert warm.cached_tokens == 512 and second.stats.cluster_hit_tokens == 512
        assert warm.tokens == full.tokens
        assert float((warm.first_logits - full.first_logits).abs().max()) < 1e-4
    finally:
        first.close()
        second.close()


def test_the_default_codec_keeps_the_greedy_tokens_close(start_cluster, model_and_prompt):
    model, prompt = model_and_prompt
    cluster = start_cluster(2, memory_bytes=256 << 20)
    full = generate(model, None, prompt, 64)
    first, second = (connector(cluster.members, CacheGenCodec(), "float16") for _ in range(2))
    try:
        generate(model, first, prompt, 1)
        assert first.store_worker.drain(30)
        warm = generate(model, second, prompt, 64)
        assert warm.cached_tokens == 512
        agreement = sum(a == b for a, b in zip(warm.tokens, full.tokens)) / 64
        exact = torch.log_softmax(full.first_logits, -1)
        kl = float((exact.exp() * (exact - torch.log_softmax(warm.first_logits, -1))).sum())
        print(f"default cachegen: greedy agreement {agreement:.3f}, first-token KL {kl:.2e}")
        # the codec's measured league (benchmarks/codecs.py: mean KL 1.1e-2 over 1,408 tokens)
        assert warm.tokens[0] == full.tokens[0] and kl < 0.05
    finally:
        first.close()
        second.close()
