"""The vLLM adapter against real vLLM (the CPU build): two engines in separate processes share one
cluster, and the second serves a prompt whose prefix the first computed by loading it instead of
prefilling, with the same greedy tokens as a cold run. Also the paged layout against the CPU
attention backend's own view of its cache, and the adapter's settings."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcache.client.cluster import ClusterClient
from kvcache.connector.paged import PagedKV
from kvcache.connector.vllm_settings import VllmSettings
from kvcache.core.keys import Namespace, chunk_keys

ENGINE = Path(__file__).with_name("vllm_engine.py")
SHARED_TOKENS = 1100  # not a multiple of the chunk: the last partial chunk is recomputed
VOCAB = 2048


def cpu_backend_view(layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values exactly as vLLM's CPU attention backend slices its cache."""
    blocks, heads, block_size, _ = layer.shape
    return layer.view(blocks, heads, block_size * 2, -1).chunk(2, dim=2)


def test_paged_kv_reads_and_writes_what_the_cpu_backend_sees():
    block_size, heads, head_dim = 4, 2, 3
    layers = [torch.zeros(6, heads, block_size, 2 * head_dim) for _ in range(2)]
    paged = PagedKV(layers, block_size)
    block_ids = [5, 1, 3]  # a request's blocks, in token order
    kv = torch.randn(2, 2, 9, heads, head_dim)  # tokens 2..10
    paged.scatter(kv, block_ids, start=2)
    for layer, expected in zip(layers, kv):
        keys, values = cpu_backend_view(layer)
        for token in range(2, 11):
            block, offset = block_ids[token // block_size], token % block_size
            assert torch.equal(keys[block, :, offset], expected[0, token - 2])
            assert torch.equal(values[block, :, offset], expected[1, token - 2])
    assert torch.equal(paged.gather(block_ids, 2, 11), kv)
    assert not layers[0][[0, 2, 4]].any()  # blocks the request does not own are untouched
    with pytest.raises(ValueError, match="need 3 blocks"):
        paged.gather(block_ids[:2], 0, 9)


def test_settings_come_from_extra_config_then_env_and_refuse_unknown_keys():
    env = {"KVCACHE_ETCD": "10.0.0.1:2379", "KVCACHE_CLUSTER": "prod", "KVCACHE_CODEC": "int8"}
    settings = VllmSettings.from_sources({"codec": "none", "local_bytes": "1Gi"}, env)
    assert (settings.etcd, settings.cluster, settings.codec) == ("10.0.0.1:2379", "prod", "none")
    assert settings.local_bytes == 1 << 30
    with pytest.raises(ValueError, match="unknown kvcache setting.*'membrs'"):
        VllmSettings.from_sources({"membrs": "n0=tcp://a:1"}, {})
    with pytest.raises(ValueError, match="codec 'zip'"):
        VllmSettings.from_sources({"codec": "zip"}, {})
    with pytest.raises(ValueError, match="node_id=tcp://host:port"):
        VllmSettings.from_sources({"members": "n0=a:1"}, {})
    assert VllmSettings.from_sources({}, {}).client_factory() is None


def test_an_engine_reaches_a_curvezmq_cluster_with_the_keys_it_is_given(start_node):
    """The operator hands joined engines the nodes' public key and the engines' own pair (in
    KVCACHE_CURVE_* variables); an engine without the pair gets a fresh one, off the allow-list."""
    import zmq

    server_public, server_secret = (key.decode() for key in zmq.curve_keypair())
    client_public, client_secret = (key.decode() for key in zmq.curve_keypair())
    node = start_node(env={"KVCACHE_CURVE_PUBLIC_KEY": server_public,
                           "KVCACHE_CURVE_SECRET_KEY": server_secret,
                           "KVCACHE_CURVE_ALLOWED_CLIENTS": client_public})  # fmt: skip
    env = {"KVCACHE_MEMBERS": f"n0={node.member.address}",
           "KVCACHE_CURVE_SERVER_KEY": server_public}  # fmt: skip
    pair = {"KVCACHE_CURVE_PUBLIC_KEY": client_public, "KVCACHE_CURVE_SECRET_KEY": client_secret}
    allowed = VllmSettings.from_sources({}, {**env, **pair})
    assert client_secret not in repr(allowed)
    key, value = os.urandom(32), os.urandom(100_000)
    with allowed.client_factory()() as client:
        assert client.put([key], [value]) == [True]
        assert bytes(client.get([key])[0]) == value
    with VllmSettings.from_sources({}, env).client_factory()() as stranger:
        assert stranger.get([key]) == [None]
    with pytest.raises(ValueError, match="KVCACHE_CURVE_SECRET_KEY"):
        VllmSettings.from_sources({}, {**env, "KVCACHE_CURVE_PUBLIC_KEY": client_public})
    with pytest.raises(ValueError, match="Z85"):
        VllmSettings.from_sources({"curve_server_key": "not a key"}, {})


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random-weight Llama saved locally (no download): vLLM serves it on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def run_engine(
    model: Path, prompts: list[dict], members: str, tmp: Path, name: str
) -> tuple[list[dict], str]:
    """What the engine reported for each prompt, and its log."""
    prompts_file, out_file = tmp / f"{name}-prompts.json", tmp / f"{name}-out.json"
    prompts_file.write_text(json.dumps(prompts))
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    command = [sys.executable, str(ENGINE), str(model), str(prompts_file), str(out_file)]
    done = subprocess.run(
        [*command, "--members", members], env=env, capture_output=True, text=True, timeout=400
    )  # an empty `members`: no cluster, the local tier alone
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out_file.read_text()), done.stdout + done.stderr


@pytest.mark.timeout(900)
def test_a_second_engine_loads_the_prefix_the_first_computed(start_cluster, tiny_llama, tmp_path):
    cluster = start_cluster(2, memory_bytes=128 << 20)
    members = ",".join(f"{m.node_id}={m.address}" for m in cluster.members)
    rng = random.Random(3)

    def tokens(count: int) -> list[int]:
        return [rng.randrange(VOCAB) for _ in range(count)]

    shared, other = tokens(SHARED_TOKENS), tokens(SHARED_TOKENS)
    first, second = shared + tokens(40), shared + tokens(60)
    other_first, other_second = other + tokens(30), other + tokens(50)
    # Engine A computes `first` and `other_first` and stores their chunks. The `second` prompts
    # under a salt of their own are the cold references: neither vLLM's prefix cache nor the
    # cluster has anything for them.
    a, _ = run_engine(
        tiny_llama,
        [
            {"tokens": first},
            {"tokens": other_first},
            {"tokens": second, "salt": "cold"},
            {"tokens": other_second, "salt": "cold"},
        ],
        members, tmp_path, "a",
    )  # fmt: skip
    assert [r["num_cached_tokens"] for r in a] == [0, 0, 0, 0]

    namespace = Namespace(model="tiny-llama", kv_dtype="float32")
    with ClusterClient(cluster.members) as client:
        for prompt in (first, other_first):  # stored before A exited
            assert client.lookup_prefix(chunk_keys(prompt, namespace, 256)) == len(prompt) // 256
        # one chunk of the other prefix turns to garbage: B must notice and recompute from there
        broken = chunk_keys(other, namespace, 256)[2]
        assert client.delete([broken]) == [True]
        assert client.put([broken], [b"not a KV blob"]) == [True]

    # Engine B, a fresh process with an empty prefix cache, loads the shared prefixes.
    b, log = run_engine(
        tiny_llama,
        [
            {"tokens": second},
            {"tokens": second, "salt": "another tenant"},
            {"tokens": other_second},
        ],
        members, tmp_path, "b",
    )  # fmt: skip
    loaded = b[0]["num_cached_tokens"]
    assert loaded == SHARED_TOKENS // 256 * 256 and loaded >= 0.9 * SHARED_TOKENS
    assert b[0]["tokens"] == a[2]["tokens"]
    assert b[1]["num_cached_tokens"] == 0  # another salt shares nothing
    assert b[1]["tokens"] == a[2]["tokens"]
    assert "Recovered from KV load failure" in log  # vLLM was told, and recomputed
    assert b[2]["tokens"] == a[3]["tokens"]  # from the two chunks before the broken one


@pytest.mark.timeout(600)
def test_without_a_cluster_a_repeated_prompt_loads_from_the_engines_local_tier(
    tiny_llama, tmp_path
):
    """The scheduler runs apart from the worker's local tier: it learns the tier's keys from
    the worker's reports, so once vLLM's own prefix cache is emptied the prompt's chunks load
    from the tier (with no cluster at all) instead of being prefilled again."""
    prompt = [random.Random(5).randrange(VOCAB) for _ in range(700)]
    results, _ = run_engine(
        tiny_llama, [{"tokens": prompt}, {"tokens": prompt, "reset": True}], "", tmp_path, "solo"
    )
    assert results[0]["num_cached_tokens"] == 0
    assert results[1]["num_cached_tokens"] == 512  # two whole chunks from the local tier
    assert results[1]["tokens"] == results[0]["tokens"]
