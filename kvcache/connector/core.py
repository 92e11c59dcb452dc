"""The engine-independent connector: find, load and store a prompt's KV by chunks.

Token ids are cut into chunks of `chunk_tokens` and named by chained keys (`kvcache.core.keys`),
so a key names its whole prefix and the longest cached prefix is the longest run of leading keys
found. The local tier answers first; the cluster is asked once, in one batched lookup, for the
keys after the local run. Loads decode each chunk's blob; stores go through the `StoreWorker` so
a request never waits on the cluster. Every cluster failure turns into a miss: the engine then
prefills, which is always correct.

Adapters (transformers, vLLM) turn their engine's cache into KV tensors `[layers, 2, tokens,
kv_heads, head_dim]` and back; this module knows nothing of either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvcache.client.cluster import ClusterClient
from kvcache.connector.local_tier import LocalTier
from kvcache.connector.store_worker import StoreWorker
from kvcache.core.keys import DEFAULT_CHUNK_TOKENS, Namespace, chunk_keys
from kvcache.kernels import decode, encode
from kvcache.kernels.blob import BlobError
from kvcache.kernels.codec import DTYPES, Codec

log = logging.getLogger(__name__)
GiB = 1 << 30
# The engines' default codec: int8 halves fp16 KV and kept all 64 greedy tokens of every demo
# prompt (benchmarks/agreement.py); cachegen moves 2.5x fewer bytes again but changes greedy
# continuations, so it is the choice where the network, not quality, is the limit.
DEFAULT_CODEC = "int8"
# An engine waits on its cluster calls, so it gives up sooner than a plain client and skips a
# node that timed out for longer: a dead cluster costs one short stall every few seconds.
ENGINE_TIMEOUT_S = 0.5
ENGINE_DOWN_BACKOFF_S = 5.0


@dataclass(frozen=True)
class ConnectorConfig:
    namespace: Namespace
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    local_bytes: int = 2 * GiB
    store_queue_bytes: int = GiB  # chunks waiting to be stored, copied out of the engine

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1 or self.local_bytes < 0 or self.store_queue_bytes < 1:
            raise ValueError(f"bad connector config: {self}")
        if self.namespace.kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype {self.namespace.kv_dtype!r} is not one of {sorted(DTYPES)}")


@dataclass
class ConnectorStats:
    lookups: int = 0
    lookup_tokens: int = 0
    local_hit_tokens: int = 0
    cluster_hit_tokens: int = 0
    bytes_loaded_local: int = 0
    bytes_loaded_cluster: int = 0
    load_failures: int = 0
    lookup_seconds: float = 0.0
    load_seconds: float = 0.0


@dataclass(frozen=True)
class PrefixHit:
    """What `lookup` found: the prompt's chunk keys and how many leading ones are cached."""

    keys: list[bytes]
    local_chunks: int
    cluster_chunks: int
    chunk_tokens: int

    @property
    def chunks(self) -> int:
        return self.local_chunks + self.cluster_chunks

    @property
    def tokens(self) -> int:
        return self.chunks * self.chunk_tokens


@dataclass
class _Clients:
    """One cluster client per thread that talks to the cluster (ZeroMQ sockets are not thread
    safe): the engine's thread looks up and loads, the store worker puts."""

    factory: Callable[[], ClusterClient] | None
    by_role: dict[str, ClusterClient] = field(default_factory=dict)

    def get(self, role: str) -> ClusterClient | None:
        if self.factory is None:
            return None
        if role not in self.by_role:
            self.by_role[role] = self.factory()
        return self.by_role[role]

    def close(self) -> None:
        for client in self.by_role.values():
            client.close()


class Connector:
    def __init__(
        self,
        config: ConnectorConfig,
        codec: Codec,
        cluster: Callable[[], ClusterClient] | None,
    ) -> None:
        """`cluster` makes a client for the cluster (called once per thread that needs one);
        None runs with the local tier alone."""
        self.config = config
        self.codec = codec
        self.local = LocalTier(config.local_bytes)
        self.stats = ConnectorStats()
        self._clients = _Clients(cluster)
        self.store_worker = StoreWorker(self._encode, self._store_blobs, config.store_queue_bytes)

    def close(self) -> None:
        self.store_worker.close()
        self._clients.close()

    def keys(
        self, token_ids: Sequence[int], salt: str | None = None, lora: str = ""
    ) -> list[bytes]:
        """Chunk keys of `token_ids` for a request with vLLM's `cache_salt` and LoRA adapter
        (`Namespace.for_request`)."""
        namespace = self.config.namespace.for_request(lora, salt)
        return chunk_keys(token_ids, namespace, self.config.chunk_tokens)

    def lookup(
        self,
        token_ids: Sequence[int],
        max_tokens: int | None = None,
        salt: str | None = None,
        lora: str = "",
        local_prefix: Callable[[list[bytes]], int] | None = None,
    ) -> PrefixHit:
        """The longest cached prefix of `token_ids` (at most `max_tokens` tokens), in chunks.
        `local_prefix` counts the leading keys a local tier held elsewhere has (vLLM's
        scheduler asks its mirror of the worker's); by default this connector's own."""
        started = time.perf_counter()
        usable = len(token_ids) if max_tokens is None else min(len(token_ids), max_tokens)
        keys = self.keys(token_ids[:usable], salt, lora)
        local = (local_prefix or self.local.prefix_length)(keys)
        remote = 0
        client = self._clients.get("engine")
        if client is not None and local < len(keys):
            try:
                remote = client.lookup_prefix(keys[local:])
            except Exception:  # noqa: BLE001 - a cluster that fails is a cluster that misses
                log.warning("cluster lookup failed; prefilling", exc_info=True)
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(token_ids)
        self.stats.lookup_seconds += time.perf_counter() - started
        return PrefixHit(keys, local, remote, self.config.chunk_tokens)

    def load(self, hit: PrefixHit, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """KV `[layers, 2, tokens, heads, head_dim]` of the hit's chunks, or of the longest run of
        them that could still be read and decoded (a chunk may be evicted or corrupt between
        lookup and load); None if not even the first chunk could."""
        started = time.perf_counter()
        blobs: list[bytes] = []
        for key in hit.keys[: hit.local_chunks]:
            blob = self.local.get(key)
            if blob is None:
                break
            blobs.append(blob)
            self.stats.bytes_loaded_local += len(blob)
        local_blobs = len(blobs)
        if local_blobs == hit.local_chunks and hit.cluster_chunks:
            blobs += self._fetch(hit.keys[local_blobs : hit.chunks])
        parts: list[torch.Tensor] = []
        for blob in blobs:
            try:
                part = decode(blob, device)
            except BlobError:
                log.warning("a cached chunk does not decode; prefilling from there", exc_info=True)
                self.stats.load_failures += 1
                break
            problem = self._misshapen(part, parts[0] if parts else None)
            if problem:
                # well formed, but not this chunk's KV: put in place it would shift every token
                log.warning("a cached chunk %s; prefilling from there", problem)
                self.stats.load_failures += 1
                break
            parts.append(part)
        loaded = len(parts)
        # what came from the cluster is kept close; the whole chain counts as just used
        self.local.put_chain(hit.keys[local_blobs:loaded], blobs[local_blobs:loaded])
        self.local.touch_chain(hit.keys[:loaded])
        self.stats.local_hit_tokens += min(loaded, local_blobs) * hit.chunk_tokens
        self.stats.cluster_hit_tokens += max(0, loaded - local_blobs) * hit.chunk_tokens
        self.stats.load_seconds += time.perf_counter() - started
        return torch.cat(parts, dim=2) if parts else None

    def _misshapen(self, part: torch.Tensor, first: torch.Tensor | None) -> str | None:
        """Why a decoded chunk is not a chunk of this namespace's KV, or None if it is."""
        expected_dtype = DTYPES[self.config.namespace.kv_dtype]
        if part.dim() != 5 or part.shape[1] != 2:
            return f"has shape {tuple(part.shape)}, not [layers, 2, tokens, kv_heads, head_dim]"
        if part.shape[2] != self.config.chunk_tokens:
            return f"holds {part.shape[2]} tokens, not {self.config.chunk_tokens}"
        if part.dtype != expected_dtype:
            return f"is {part.dtype}, not {expected_dtype}"
        if first is not None and part.shape != first.shape:
            return f"has shape {tuple(part.shape)}, its prefix {tuple(first.shape)}"
        return None

    def load_keys(
        self, keys: list[bytes], device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """`load` for a run of chunk keys that may start past a prompt's first chunk (a key names
        its whole prefix, so any run of a chain loads on its own)."""
        local = self.local.prefix_length(keys)
        return self.load(
            PrefixHit(keys, local, len(keys) - local, self.config.chunk_tokens), device
        )

    def store(self, token_ids: Sequence[int], kv: torch.Tensor, cached_tokens: int = 0) -> int:
        """Queue the full chunks of `kv` (the KV of `token_ids`) past the first `cached_tokens`
        tokens for storing; returns how many chunks were queued (0 when the queue was full)."""
        size = self.config.chunk_tokens
        keys = self.keys(token_ids[: kv.shape[2]])
        first = cached_tokens // size
        return self.store_chunks(keys[first:], kv[:, :, first * size : len(keys) * size])

    def store_chunks(self, keys: list[bytes], kv: torch.Tensor) -> int:
        """Queue `kv`, the KV of the chunks named by `keys` back to back, for storing; returns
        how many chunks were queued (0 when there were none or the queue was full)."""
        size = self.config.chunk_tokens
        if not keys:
            return 0
        if kv.shape[2] != len(keys) * size:
            raise ValueError(f"{len(keys)} chunk keys need {len(keys) * size} tokens of KV")
        chunks = [
            kv[:, :, index * size : (index + 1) * size].detach().to("cpu", copy=True)
            for index in range(len(keys))
        ]
        return len(chunks) if self.store_worker.submit(keys, chunks) else 0

    def _fetch(self, keys: list[bytes]) -> list[bytes]:
        """Leading blobs of `keys` that the cluster returns (stops at the first miss)."""
        client = self._clients.get("engine")
        try:
            values = client.get(keys) if client is not None else []
        except Exception:  # noqa: BLE001 - a failing cluster is a miss
            log.warning("cluster get failed; prefilling", exc_info=True)
            return []
        blobs = []
        for value in values:
            if value is None:
                break
            blob = bytes(value)
            self.stats.bytes_loaded_cluster += len(blob)
            blobs.append(blob)
        return blobs

    def _encode(self, chunk: torch.Tensor) -> bytes:
        return encode(chunk.to(DTYPES[self.config.namespace.kv_dtype]), self.codec)

    def _store_blobs(self, keys: list[bytes], blobs: list[bytes]) -> int:
        self.local.put_chain(keys, blobs)
        client = self._clients.get("store")
        if client is None:
            return 0
        stored = client.put(keys, blobs)
        return sum(len(blob) for blob, ok in zip(blobs, stored) if ok)
