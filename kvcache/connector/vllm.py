"""The vLLM adapter: `KVCacheConnector`, loaded by vLLM with

    --kv-transfer-config '{"kv_connector": "KVCacheConnector",
                           "kv_connector_module_path": "kvcache.connector.vllm",
                           "kv_role": "kv_both"}'

and configured by `kv_connector_extra_config` or `KVCACHE_*` variables (`vllm_settings.py`).

vLLM makes two instances. The scheduler's decides: for a new request, one batched lookup of the
prompt's chunk keys says how many tokens past vLLM's own prefix-cache hit the worker's local tier
and then the cluster hold (whole chunks, always leaving the prompt's last token to compute; the
scheduler knows the local tier's keys from the changes the worker reports each step). Each
step's metadata then names, per request, the tokens to load into which blocks and, once its
prefill is complete, the new full chunks to store. The worker's moves the bytes: before the
forward it loads each request's chunks (local tier, then cluster), decodes them and writes them
into the paged cache; after the forward it copies the new chunks out of the pages and queues
them on the store worker.

Loads are synchronous: on the CPU a decoded chunk is written straight into the pages, and the
forward needs it anyway. A chunk that is gone or corrupt by load time is reported as failed
blocks, and vLLM recomputes from there (the connector sets `kv_load_failure_policy` to
`recompute`: a cache that misses must cost prefill, never a request). Stores copy the chunks out
before the step ends, so vLLM may free the blocks at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
from vllm.model_executor.models.utils import extract_layer_index

from kvcache.connector.core import Connector, ConnectorConfig
from kvcache.connector.paged import PagedKV
from kvcache.connector.vllm_settings import VllmSettings
from kvcache.core.keys import EngineKeySettings
from kvcache.kernels import codec_by_name
from kvcache.kernels.codec import DTYPE_NAMES

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class ChunkTransfer:
    """Tokens `[start, end)` of one request, moving between the cache and its blocks;
    `token_ids` are the request's tokens up to `end`, whose chunk keys name the KV."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    end: int
    salt: str | None = None
    lora: str = ""


@dataclass
class KVCacheMetadata(KVConnectorMetadata):
    loads: list[ChunkTransfer] = field(default_factory=list)
    stores: list[ChunkTransfer] = field(default_factory=list)


@dataclass
class LocalTierChanges(KVConnectorWorkerMetadata):
    """What came into and left the worker's local tier in one step (key -> held), sent to the
    scheduler side, which keeps a mirror of the tier's keys for its lookups. Only the first
    rank's: the scheduler looks up rank 0's keys, and a chunk another rank lost is a failed
    load, recomputed."""

    changes: dict[bytes, bool]

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, LocalTierChanges):
            return LocalTierChanges({**self.changes, **other.changes})
        return self


@dataclass
class _Admitted:
    """A request from admission to the end of its prefill, as the scheduler side tracks it."""

    prompt: list[int]
    salt: str | None
    lora: str
    load: tuple[int, int] | None  # tokens to load before the first forward
    cluster_tokens: int  # the prefix the cache holds: stores start there, not at vLLM's own hit
    block_ids: list[int] = field(default_factory=list)


def key_settings(vllm_config: VllmConfig, settings: VllmSettings) -> EngineKeySettings:
    """What this engine binds into its chunk keys (every rank alike), from its own config: the
    same on the scheduler, the workers and the API server, which publishes it for the router."""
    model = vllm_config.model_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = model.dtype if cache_dtype == "auto" else getattr(torch, cache_dtype, None)
    if dtype not in DTYPE_NAMES:
        raise ValueError(
            f"kvcache stores float16, bfloat16 or float32 KV; this engine's cache is {cache_dtype}"
        )
    served = model.served_model_name
    name = settings.model or (served if isinstance(served, str) else model.model)
    parallel = vllm_config.parallel_config
    return EngineKeySettings(
        model=name,
        revision=model.revision or "",
        kv_dtype=DTYPE_NAMES[dtype],
        tp_size=parallel.tensor_parallel_size,
        pp_size=parallel.pipeline_parallel_size,
        chunk_tokens=settings.chunk_tokens,
        tenant_salt=settings.tenant_salt,
    )


def _platform_served() -> bool:
    """Whether the adapter can read this platform's pages: only the CPU backend's so far (other
    backends lay their pages out otherwise, and guessing would store wrong KV). Elsewhere it
    stands aside with one log line, and the engine serves without the cache, never crashes."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return True
    log.error(
        "kvcache: vLLM's %s platform is not served yet (the connector reads the CPU backend's "
        "pages only); this engine serves without the cache",
        type(current_platform).__name__,
    )
    return False


def _lora(request: Request) -> str:
    """The request's LoRA adapter, bound into its chunk keys ("" for the base model)."""
    return request.lora_request.lora_name if request.lora_request is not None else ""


def _worker_ranks() -> tuple[int, int]:
    """This worker's tensor- and pipeline-parallel ranks. Only a worker has them: the scheduler
    side runs where no parallel group exists, and looks up rank 0's keys."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    return get_tp_group().rank_in_group, get_pp_group().rank_in_group


class NamespaceInfo(KVConnectorPromMetrics):
    """`kvcache:chunk_namespace_info{...} 1` on the engine's /metrics: the key settings the router
    needs to name this engine's chunks (never the tenant salt, which the operator gives it)."""

    NAME = "kvcache:chunk_namespace_info"

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        if not _platform_served():
            return  # a connector that stands aside loads nothing: the router must not credit it
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        settings = VllmSettings.from_sources(extra)
        published = key_settings(vllm_config, settings).published()
        _unregister(self.NAME)  # an engine made again in one process registers it again
        gauge = self._gauge_cls(
            name=self.NAME,
            documentation="The settings kvcache binds into this engine's chunk keys",
            multiprocess_mode="mostrecent",
            labelnames=[*labelnames, *published],
        )
        for values in per_engine_labelvalues.values():
            gauge.labels(*values, *published.values()).set(1)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        return  # a constant: nothing to record per step


def _unregister(name: str) -> None:
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - as vLLM does
        if getattr(collector, "_name", None) == name:
            REGISTRY.unregister(collector)


class KVCacheConnector(KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        settings = VllmSettings.from_sources(transfer.kv_connector_extra_config)
        self._block_size = vllm_config.cache_config.block_size
        if settings.chunk_tokens % self._block_size:
            raise ValueError(
                f"kvcache chunk_tokens {settings.chunk_tokens} must be a multiple of vLLM's "
                f"block size {self._block_size}"
            )
        if transfer.kv_load_failure_policy != "recompute":
            log.info("kvcache: a chunk that fails to load is recomputed, never a failed request")
            transfer.kv_load_failure_policy = "recompute"
        worker = role == KVConnectorRole.WORKER
        self._served = _platform_served()
        tp_rank, pp_rank = _worker_ranks() if worker else (0, 0)
        self._connector = Connector(
            # the scheduler side only looks up: it keeps no chunks and stores nothing
            ConnectorConfig(
                key_settings(vllm_config, settings).namespace(tp_rank, pp_rank),
                chunk_tokens=settings.chunk_tokens,
                local_bytes=settings.local_bytes if worker else 0,
                store_queue_bytes=settings.store_queue_bytes,
            ),
            codec_by_name(settings.codec),
            settings.client_factory(),
        )
        self._chunk = settings.chunk_tokens
        # scheduler side
        self._hits: dict[str, int] = {}
        self._admitted: dict[str, _Admitted] = {}
        self._local_keys: set[bytes] = set()  # what the first worker's local tier holds
        self._reports_local_tier = worker and (tp_rank, pp_rank) == (0, 0)
        # worker side
        self._paged: PagedKV | None = None
        self._failed_blocks: set[int] = set()
        log.info(
            "kvcache connector (%s): codec %s, %d-token chunks, cluster %s",
            role.name.lower(), settings.codec, self._chunk,
            settings.etcd or settings.members or "none (local tier only)",
        )  # fmt: skip

    @property
    def connector(self) -> Connector:
        return self._connector

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        """The API server's /metrics carries the engine's key settings (`NamespaceInfo`)."""
        return NamespaceInfo(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    # ---- scheduler side ----

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        if not self._served:
            return 0, False  # standing aside: nothing is loaded or stored
        if request.mm_features:
            # its KV depends on images the token ids only stand for: not keyed yet, not cached
            return 0, False
        prompt = request.prompt_token_ids or []
        hit = self._connector.lookup(
            prompt, len(prompt) - 1, request.cache_salt, _lora(request), self._local_prefix
        )
        self._hits[request.request_id] = hit.tokens
        return max(0, hit.tokens - num_computed_tokens), False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if request.request_id not in self._hits:
            return  # not cacheable (multimodal)
        end = self._hits.pop(request.request_id)
        load = (end - num_external_tokens, end) if num_external_tokens > 0 else None
        prompt = list(request.prompt_token_ids or [])
        self._admitted[request.request_id] = _Admitted(
            prompt, request.cache_salt, _lora(request), load, end
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVCacheMetadata:
        meta = KVCacheMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            admitted = self._admitted.get(new.req_id)
            if admitted is not None:
                admitted.block_ids = list(new.block_ids[0])
                self._plan(meta, new.req_id, admitted, new.num_computed_tokens, scheduled)
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            admitted = self._admitted.get(req_id)
            if admitted is None:
                continue
            new_blocks = cached.new_block_ids[index]
            if req_id in cached.resumed_req_ids:  # after preemption: all its blocks, anew
                admitted.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                admitted.block_ids += new_blocks[0]
            self._plan(meta, req_id, admitted, cached.num_computed_tokens[index], scheduled)
        return meta

    def _plan(
        self,
        meta: KVCacheMetadata,
        req_id: str,
        admitted: _Admitted,
        computed: int,
        scheduled: dict[str, int],
    ) -> None:
        if admitted.load is not None:
            start, end = admitted.load
            meta.loads.append(self._transfer(req_id, admitted, start, end))
            admitted.load = None
        if computed + scheduled.get(req_id, 0) < len(admitted.prompt):
            return  # the prefill goes on next step
        del self._admitted[req_id]
        full = len(admitted.prompt) // self._chunk * self._chunk
        # from the cache's own prefix: chunks vLLM found in its own blocks (a chat's earlier
        # replies) are stored too, or other engines could only load the turns before them
        first = admitted.cluster_tokens
        if full > first:
            meta.stores.append(self._transfer(req_id, admitted, first, full))

    @staticmethod
    def _transfer(req_id: str, admitted: _Admitted, start: int, end: int) -> ChunkTransfer:
        return ChunkTransfer(
            req_id, admitted.prompt[:end], admitted.block_ids, start, end,
            admitted.salt, admitted.lora,
        )  # fmt: skip

    def _local_prefix(self, keys: list[bytes]) -> int:
        held = self._local_keys
        return next((i for i, key in enumerate(keys) if key not in held), len(keys))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        changes = connector_output.kv_connector_worker_meta
        if isinstance(changes, LocalTierChanges):
            for key, held in changes.changes.items():
                if held:
                    self._local_keys.add(key)
                else:
                    self._local_keys.discard(key)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._admitted.pop(request.request_id, None)
        self._hits.pop(request.request_id, None)
        return False, None

    # ---- worker side ----

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not self._served:
            return
        names = sorted(kv_caches, key=extract_layer_index)
        self._paged = PagedKV([kv_caches[name] for name in names], self._block_size)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVCacheMetadata)
        for load in meta.loads:
            try:
                loaded_to = self._load(load)
            except Exception:  # noqa: BLE001 - a load that fails is a miss, never a crash
                log.warning("kvcache: loading %s failed; recomputing", load.req_id, exc_info=True)
                loaded_to = load.start
            if loaded_to < load.end:
                first_block = loaded_to // self._block_size
                last_block = -(-load.end // self._block_size)
                self._failed_blocks.update(load.block_ids[first_block:last_block])

    def _load(self, load: ChunkTransfer) -> int:
        """Writes what it can of the load into the pages; returns the end of what it wrote."""
        assert self._paged is not None, "register_kv_caches comes first"
        first = load.start // self._chunk * self._chunk
        keys = self._connector.keys(load.token_ids, load.salt, load.lora)[first // self._chunk :]
        kv = self._connector.load_keys(keys)
        loaded_to = first + (0 if kv is None else kv.shape[2])
        if loaded_to > load.start:
            end = min(loaded_to, load.end)
            self._paged.scatter(
                kv[:, :, load.start - first : end - first], load.block_ids, load.start
            )
        # a load that starts mid-chunk and finds nothing failed from its own start: the tokens
        # before it are vLLM's own hit, not blocks to recompute
        return max(load.start, min(loaded_to, load.end))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv has written every layer

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        return  # chunks are copied out whole in wait_for_save, once the step's KV is written

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVCacheMetadata)
        for store in meta.stores:
            try:
                assert self._paged is not None, "register_kv_caches comes first"
                kv = self._paged.gather(store.block_ids, store.start, store.end)
                keys = self._connector.keys(store.token_ids, store.salt, store.lora)[
                    store.start // self._chunk :
                ]
                self._connector.store_chunks(keys, kv)
            except Exception:  # noqa: BLE001 - a store that fails costs future hits only
                log.warning("kvcache: storing %s failed", store.req_id, exc_info=True)

    def build_connector_worker_meta(self) -> LocalTierChanges | None:
        if not self._reports_local_tier:
            return None
        changes = self._connector.local.drain_changes()
        return LocalTierChanges(changes) if changes else None

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        """Lets queued stores finish (bounded), so what this engine computed outlives it."""
        self._connector.store_worker.drain(timeout=30)
        self._connector.close()
