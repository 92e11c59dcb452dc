"""Chunk keys: the names under which KV chunks are stored in the cluster.

A prompt's token ids are cut into chunks of ``chunk_tokens`` tokens. Chunk i's key is
``H(key(i-1) || tag || token_bytes(chunk i))`` with ``key(-1) = namespace.root_key()``, so a key
names its whole prefix: equal keys mean equal prefixes (within one namespace), and the longest
cached prefix is found by walking the keys in order. The connector, the router and the tests all
compute keys here, so they agree byte for byte.

``H`` is BLAKE2b with a 32-byte digest: prompts are chosen by users, so collisions must be
infeasible, and ``Namespace`` binds everything that makes KV differ (model, revision, layout,
dtype, tensor- and pipeline-parallel rank, LoRA adapter, tenant salt) so two namespaces never
share a key. ``EngineKeySettings.namespace`` is the one place a namespace is made from an engine's
settings: the connector calls it with what it reads off its engine, the router with what the
engine publishes (`kvcache:chunk_namespace_info` on its /metrics) and the salt the operator gave
it, so both name a chunk alike.

This module must never do I/O, keep state between calls, or depend on anything process-local
(``hash()``, ``PYTHONHASHSEED``, platform byte order): every process must derive the same keys.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import NewType

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "KEY_BYTES",
    "ChunkKey",
    "EngineKeySettings",
    "Namespace",
    "chunk_keys",
    "token_bytes",
]

KEY_BYTES = 32
DEFAULT_CHUNK_TOKENS = 256
DEFAULT_KV_LAYOUT = "layers,2,tokens,kv_heads,head_dim"

ChunkKey = NewType("ChunkKey", bytes)

# Domain tags. Changing the encoding means bumping the version, which moves every key (an old
# cache then simply misses instead of serving KV computed under different rules).
_NAMESPACE_TAG = b"kvcache-ns-v2"
# Full and partial chunk tags have equal length, so the hashed message is parsed unambiguously:
# 32-byte parent key, 10-byte tag, then the chunk's payload.
_FULL_CHUNK_TAG = b"kvc1/full\x00"
_PARTIAL_CHUNK_TAG = b"kvc1/part\x00"
assert len(_FULL_CHUNK_TAG) == len(_PARTIAL_CHUNK_TAG)

_TOKEN_LIMIT = 2**32


def _hash(*parts: bytes | memoryview) -> ChunkKey:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for part in parts:
        h.update(part)
    return ChunkKey(h.digest())


def _field(data: bytes) -> bytes:
    """Length-prefix a field, so ("ab", "c") and ("a", "bc") encode differently."""
    return struct.pack("<Q", len(data)) + data


@dataclass(frozen=True)
class Namespace:
    """Everything that makes two KV tensors for the same tokens differ.

    Two namespaces that differ in any field have disjoint keys; a tenant salt therefore keeps
    tenants apart whatever tokens they send.
    """

    model: str
    revision: str = ""
    kv_layout: str = DEFAULT_KV_LAYOUT
    kv_dtype: str = "float16"
    world_size: int = 1  # tensor-parallel
    rank: int = 0
    tenant_salt: bytes = b""
    pp_size: int = 1  # pipeline-parallel stages: each holds its own layers' KV
    pp_rank: int = 0
    lora: str = ""  # the LoRA adapter the KV was computed with ("" for the base model)

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("namespace model must be non-empty")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.pp_size < 1 or not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp rank {self.pp_rank} of {self.pp_size} stages is out of range")
        if not isinstance(self.tenant_salt, bytes):
            raise ValueError("tenant_salt must be bytes")

    def for_request(self, lora: str = "", salt: str | None = None) -> Namespace:
        """The namespace of one request's KV: its LoRA adapter, and its own `cache_salt` added
        to the tenant salt (salted requests share KV only with requests of the same salt)."""
        if not lora and not salt:
            return self
        salted = self.tenant_salt + b"\x00" + salt.encode("utf-8") if salt else self.tenant_salt
        return replace(self, lora=lora or self.lora, tenant_salt=salted)

    def canonical_bytes(self) -> bytes:
        """The unambiguous encoding hashed into the root key (every field, length-prefixed)."""
        return b"".join(
            [
                _field(_NAMESPACE_TAG),
                _field(self.model.encode("utf-8")),
                _field(self.revision.encode("utf-8")),
                _field(self.kv_layout.encode("utf-8")),
                _field(self.kv_dtype.encode("utf-8")),
                struct.pack("<QQ", self.world_size, self.rank),
                _field(self.tenant_salt),
                struct.pack("<QQ", self.pp_size, self.pp_rank),
                _field(self.lora.encode("utf-8")),
            ]
        )

    def root_key(self) -> ChunkKey:
        """key(-1): the parent of chunk 0, so every chain starts inside its namespace."""
        return _hash(self.canonical_bytes())


@dataclass(frozen=True)
class EngineKeySettings:
    """What an engine binds into its chunk keys, for all its ranks: read off the engine by the
    connector, published on its /metrics without the salt (`published`), and read back there by
    the router, which takes the salt from the operator (the engine's KVCACHE_TENANT_SALT)."""

    model: str
    revision: str = ""
    kv_dtype: str = "float16"
    kv_layout: str = DEFAULT_KV_LAYOUT
    tp_size: int = 1
    pp_size: int = 1
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    tenant_salt: str = field(default="", repr=False)

    def namespace(self, tp_rank: int = 0, pp_rank: int = 0) -> Namespace:
        """The namespace of one rank's KV (the scheduler and the router look up rank 0's)."""
        return Namespace(
            model=self.model,
            revision=self.revision,
            kv_layout=self.kv_layout,
            kv_dtype=self.kv_dtype,
            world_size=self.tp_size,
            rank=tp_rank,
            tenant_salt=self.tenant_salt.encode("utf-8"),
            pp_size=self.pp_size,
            pp_rank=pp_rank,
        )

    def published(self) -> dict[str, str]:
        """Every setting but the salt, as text (Prometheus labels)."""
        return {spec.name: str(getattr(self, spec.name)) for spec in fields(self)
                if spec.name != "tenant_salt"}  # fmt: skip

    @classmethod
    def from_published(cls, labels: dict[str, str], tenant_salt: str = "") -> EngineKeySettings:
        """The settings an engine published; ValueError if any is missing or malformed."""
        try:
            return cls(
                model=labels["model"],
                revision=labels["revision"],
                kv_dtype=labels["kv_dtype"],
                kv_layout=labels["kv_layout"],
                tp_size=int(labels["tp_size"]),
                pp_size=int(labels["pp_size"]),
                chunk_tokens=int(labels["chunk_tokens"]),
                tenant_salt=tenant_salt,
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"malformed chunk namespace settings {labels}: {exc!r}") from None


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32s; fixed width so chunk boundaries are byte offsets."""
    try:
        return struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None


def chunk_keys(
    token_ids: Sequence[int],
    namespace: Namespace,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    include_partial: bool = False,
) -> list[ChunkKey]:
    """Keys of the full chunks of ``token_ids`` in order (index = depth in the prefix chain).

    With ``include_partial``, the trailing partial chunk (if any) gets a key too; it uses its own
    tag and binds its token count, so it never equals a full chunk's key and a longer partial
    chunk never shadows a shorter one. Keys depend on ``chunk_tokens``: different chunk sizes give
    unrelated keys.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    data = memoryview(token_bytes(token_ids))
    n_full, n_rest = divmod(len(token_ids), chunk_tokens)
    stride = 4 * chunk_tokens

    keys: list[ChunkKey] = []
    parent = namespace.root_key()
    for i in range(n_full):
        parent = _hash(parent, _FULL_CHUNK_TAG, data[i * stride : (i + 1) * stride])
        keys.append(parent)
    if include_partial and n_rest:
        count = struct.pack("<I", n_rest)
        keys.append(_hash(parent, _PARTIAL_CHUNK_TAG, count, data[n_full * stride :]))
    return keys
