"""The vLLM adapter's scheduler side against vLLM's own config, request and scheduler-output
objects (no engine runs): what it looks up, what it plans to load and store, and under which keys,
with a real cache node behind it. The end-to-end path with real engines is `test_vllm.py`."""

from __future__ import annotations

import functools

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.lora.request import LoRARequest
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.request import Request

from kvcache.client.cluster import ClusterClient
from kvcache.connector.vllm import KVCacheConnector, key_settings
from kvcache.connector.vllm_settings import VllmSettings
from kvcache.core.keys import EngineKeySettings, chunk_keys

CHUNK = 256
BLOCK = 128  # the CPU backend's block size


def engine_config(tmp_path_factory, members: str, tp: int = 1):
    from transformers import LlamaConfig
    from vllm.engine.arg_utils import EngineArgs

    model = tmp_path_factory.mktemp("tiny-llama-config")
    LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
    ).save_pretrained(model)  # fmt: skip
    transfer = {
        "kv_connector": "KVCacheConnector",
        "kv_connector_module_path": "kvcache.connector.vllm",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"members": members, "model": "tiny", "codec": "none"},
    }
    return EngineArgs(
        model=str(model), skip_tokenizer_init=True, dtype="float32", tensor_parallel_size=tp,
        enable_prefix_caching=True, max_model_len=4096, kv_transfer_config=transfer,
    ).create_engine_config()  # fmt: skip


@pytest.fixture
def node(start_node):
    return start_node()


@pytest.fixture
def scheduler(tmp_path_factory, node):
    config = engine_config(tmp_path_factory, f"n0={node.member.address}")
    connector = KVCacheConnector(config, KVConnectorRole.SCHEDULER)
    yield connector, config
    connector.shutdown()


def request(tokens: list[int], name: str = "r", lora: str | None = None, salt=None) -> Request:
    adapter = LoRARequest(lora, 1, "/adapters/" + lora) if lora else None
    return Request(
        name, tokens, SamplingParams(max_tokens=4), None, lora_request=adapter, cache_salt=salt
    )


def schedule(connector: KVCacheConnector, req: Request, computed: int):
    """One scheduler step that admits `req` with `computed` tokens already in vLLM's own
    blocks and schedules the rest of its prompt; returns the step's connector metadata."""
    matched, _ = connector.get_num_new_matched_tokens(req, computed)
    blocks = list(range(-(-len(req.prompt_token_ids) // BLOCK)))
    connector.update_state_after_alloc(req, None, matched)
    output = SchedulerOutput.make_empty()
    output.scheduled_new_reqs = [
        NewRequestData(
            req.request_id,
            req.prompt_token_ids,
            [],
            None,
            None,
            (blocks,),
            computed,
            req.lora_request,
        )  # fmt: skip
    ]
    output.num_scheduled_tokens = {req.request_id: len(req.prompt_token_ids) - computed}
    return matched, connector.build_connector_meta(output)


def namespace_of(config):
    return key_settings(config, VllmSettings.from_sources(
        config.kv_transfer_config.kv_connector_extra_config, {})).namespace()  # fmt: skip


def cpu_pages() -> dict[str, torch.Tensor]:
    """The tiny model's two layers of CPU-backend pages (8 blocks), as vLLM registers them."""
    return {f"model.layers.{i}.self_attn.attn": torch.randn(8, 2, BLOCK, 128) for i in range(2)}


def put_chunks(node, keys: list[bytes]) -> None:
    with ClusterClient([node.member]) as client:
        assert client.put(keys, [b"x"] * len(keys)) == [True] * len(keys)


def test_a_scheduler_with_tensor_parallel_workers_starts_and_looks_up_rank_zeros_keys(
    tmp_path_factory, node
):
    # the scheduler side has no tensor-parallel group: asking it for a rank crashed engine start
    config = engine_config(tmp_path_factory, f"n0={node.member.address}", tp=2)
    connector = KVCacheConnector(config, KVConnectorRole.SCHEDULER)
    try:
        namespace = connector.connector.config.namespace
        assert (namespace.world_size, namespace.rank) == (2, 0)
        tokens = list(range(600))
        put_chunks(node, chunk_keys(tokens, namespace, CHUNK))
        assert connector.get_num_new_matched_tokens(request(tokens), 0) == (512, False)
    finally:
        connector.shutdown()


def test_stores_start_at_the_caches_prefix_not_at_vllms_own_hit(scheduler, node):
    """A chat's next turn: vLLM holds the earlier turns (and its replies) in its own blocks, the
    cache only the first prompt's chunks. Every chunk past the cache's prefix is stored, or
    another engine could load only up to the first reply."""
    connector, config = scheduler
    tokens = list(range(1300))  # 5 full chunks
    put_chunks(node, chunk_keys(tokens, namespace_of(config), CHUNK)[:2])
    matched, meta = schedule(connector, request(tokens), computed=1024)  # vLLM's own hit
    assert matched == 0  # nothing to load past vLLM's hit
    assert [(store.start, store.end) for store in meta.stores] == [(512, 1280)]
    assert not meta.loads


def test_a_load_covers_what_the_cache_holds_past_vllms_hit(scheduler, node):
    connector, config = scheduler
    tokens = list(range(1300))
    put_chunks(node, chunk_keys(tokens, namespace_of(config), CHUNK)[:4])
    matched, meta = schedule(connector, request(tokens), computed=128)
    assert matched == 1024 - 128
    assert [(load.start, load.end) for load in meta.loads] == [(128, 1024)]
    assert [(store.start, store.end) for store in meta.stores] == [(1024, 1280)]


def test_a_lora_adapters_requests_use_other_keys_than_the_base_models(scheduler, node):
    connector, config = scheduler
    tokens = list(range(600))
    base = namespace_of(config)
    put_chunks(node, chunk_keys(tokens, base, CHUNK))  # the base model's KV only
    assert connector.get_num_new_matched_tokens(request(tokens, "a", lora="sql"), 0)[0] == 0
    assert connector.get_num_new_matched_tokens(request(tokens, "b"), 0)[0] == 512
    adapted = chunk_keys(tokens, base.for_request(lora="sql"), CHUNK)
    put_chunks(node, adapted)
    assert connector.get_num_new_matched_tokens(request(tokens, "c", lora="sql"), 0)[0] == 512
    _, meta = schedule(connector, request(list(range(900)), "d", lora="sql"), computed=0)
    (store,) = meta.stores
    assert store.lora == "sql" and (store.start, store.end) == (512, 768)


def test_multimodal_requests_are_neither_looked_up_nor_stored(scheduler, node):
    connector, config = scheduler
    tokens = list(range(600))
    put_chunks(node, chunk_keys(tokens, namespace_of(config), CHUNK))
    image = request(tokens, "img")
    image.mm_features = [object()]  # placeholders stand for an image the keys do not bind
    matched, meta = schedule(connector, image, computed=0)
    assert matched == 0 and not meta.loads and not meta.stores


def test_the_connector_and_the_router_name_an_engines_chunks_alike(scheduler):
    """What the connector keys by, published (without the salt) and read back with the salt the
    operator gave the engine, names the same chunks."""
    connector, config = scheduler
    settings = VllmSettings.from_sources(
        config.kv_transfer_config.kv_connector_extra_config, {"KVCACHE_TENANT_SALT": "t"}
    )
    own = key_settings(config, settings)
    rebuilt = EngineKeySettings.from_published(own.published(), tenant_salt="t")
    tokens = list(range(700))
    assert chunk_keys(tokens, rebuilt.namespace(), CHUNK) == chunk_keys(
        tokens, own.namespace(), CHUNK
    )
    assert own.kv_dtype == "float32" and own.chunk_tokens == CHUNK
    assert torch.float32 == config.model_config.dtype


@pytest.fixture(scope="module")
def parallel_groups():
    """vLLM's process groups for one worker (world size 1, gloo), as an engine's worker has."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=0, backend="gloo",
        )  # fmt: skip
        parallel_state.ensure_model_parallel_initialized(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    parallel_state.destroy_distributed_environment()


def test_a_load_that_starts_mid_chunk_and_misses_fails_only_its_own_blocks(
    tmp_path_factory, node, parallel_groups
):
    from kvcache.connector.vllm import ChunkTransfer, KVCacheMetadata

    config = engine_config(tmp_path_factory, f"n0={node.member.address}")
    worker = KVCacheConnector(config, KVConnectorRole.WORKER)
    try:
        worker.register_kv_caches(cpu_pages())
        tokens = list(range(600))
        # vLLM holds block 0 itself; the cache was to give tokens 128-512, and has nothing
        load = ChunkTransfer("r", tokens[:512], [0, 1, 2, 3, 4], 128, 512)
        worker.bind_connector_metadata(KVCacheMetadata(loads=[load]))
        worker.start_load_kv(None)
        assert worker.get_block_ids_with_load_errors() == {1, 2, 3}
    finally:
        worker.shutdown()


def test_the_pages_refuse_kv_of_other_heads_instead_of_broadcasting_it():
    from kvcache.connector.paged import PagedKV

    paged = PagedKV([torch.zeros(4, 2, BLOCK, 128)], BLOCK)
    one_head = torch.ones(1, 2, 16, 1, 64)
    with pytest.raises(ValueError, match="does not fit"):
        paged.scatter(one_head, [0], 0)
    assert not paged.gather([0], 0, 16).any()


def test_on_a_platform_it_cannot_read_the_connector_stands_aside_instead_of_crashing(
    tmp_path_factory, node, parallel_groups, monkeypatch, caplog
):
    """A GPU engine's pages are laid out otherwise: the connector loads and stores nothing,
    says so once, and the engine starts and serves without the cache."""
    from vllm.platforms import current_platform

    config = engine_config(tmp_path_factory, f"n0={node.member.address}")
    tokens = list(range(600))
    put_chunks(node, chunk_keys(tokens, namespace_of(config), CHUNK))
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)  # as on a CUDA build
    scheduler = KVCacheConnector(config, KVConnectorRole.SCHEDULER)
    worker = KVCacheConnector(config, KVConnectorRole.WORKER)
    try:
        matched, meta = schedule(scheduler, request(tokens), computed=0)
        assert matched == 0 and not meta.loads and not meta.stores
        worker.register_kv_caches({"model.layers.0.self_attn.attn": torch.zeros(4, 2, BLOCK, 128)})
        worker.bind_connector_metadata(meta)
        worker.start_load_kv(None)
        worker.wait_for_save()
        assert "serves without the cache" in caplog.text
        # nor does its API server publish key settings the router would credit it with
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from kvcache.connector.vllm import NamespaceInfo

        registry = CollectorRegistry()
        gauge = functools.partial(Gauge, registry=registry)
        types = {Gauge: gauge, Counter: Counter, Histogram: Histogram}
        NamespaceInfo(config, types, ["model_name", "engine"], {0: ["tiny", "0"]})
        assert not list(registry.collect())
    finally:
        scheduler.shutdown()
        worker.shutdown()


def test_the_scheduler_counts_what_the_workers_local_tier_holds_without_any_cluster(
    tmp_path_factory, parallel_groups
):
    """The worker keeps what it stored in its local tier; the scheduler runs apart from it and
    looked up the cluster alone, so an engine without one (or a chunk the cluster lost) never
    loaded from that tier. The worker's reported changes make the scheduler's lookup see it."""
    from vllm.v1.outputs import KVConnectorOutput

    from kvcache.connector.vllm import ChunkTransfer, KVCacheMetadata

    config = engine_config(tmp_path_factory, "")  # no cluster: the local tier only
    scheduler = KVCacheConnector(config, KVConnectorRole.SCHEDULER)
    worker = KVCacheConnector(config, KVConnectorRole.WORKER)
    try:
        worker.register_kv_caches(cpu_pages())
        tokens = list(range(600))
        assert scheduler.get_num_new_matched_tokens(request(tokens, "a"), 0) == (0, False)
        store = ChunkTransfer("a", tokens[:512], [0, 1, 2, 3, 4], 0, 512)
        worker.bind_connector_metadata(KVCacheMetadata(stores=[store]))
        worker.wait_for_save()
        assert worker.connector.store_worker.drain(10)
        changes = worker.build_connector_worker_meta()
        assert changes is not None and sum(changes.changes.values()) == 2
        assert worker.build_connector_worker_meta() is None  # drained: nothing new
        scheduler.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=changes))
        assert scheduler.get_num_new_matched_tokens(request(tokens, "b"), 0) == (512, False)
        # and the worker loads them from its tier
        load = ChunkTransfer("b", tokens[:512], [5, 6, 7, 0, 1], 0, 512)
        worker.bind_connector_metadata(KVCacheMetadata(loads=[load]))
        worker.start_load_kv(None)
        assert worker.get_block_ids_with_load_errors() == set()
        assert worker.connector.stats.local_hit_tokens == 512
    finally:
        scheduler.shutdown()
        worker.shutdown()
