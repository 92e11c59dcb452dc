"""Chunk keys: the names under which KV chunks are stored in the cluster.

A prompt's token ids are cut into chunks of ``chunk_tokens`` tokens. Chunk i's key is
``H(key(i-1) || tag || token_bytes(chunk i))`` with ``key(-1) = namespace.root_key()``, so a key
names its whole prefix: equal keys mean equal prefixes (within one namespace), and the longest
cached prefix is found by walking the keys in order. The connector, the router and the tests all
compute keys here, so they agree byte for byte.

``H`` is BLAKE2b with a 32-byte digest: prompts are chosen by users, so collisions must be
infeasible, and ``Namespace`` binds everything that makes KV differ (model, layout, dtype,
tensor-parallel rank, tenant salt) so two namespaces never share a key.

This module must never do I/O, keep state between calls, or depend on anything process-local
(``hash()``, ``PYTHONHASHSEED``, platform byte order): every process must derive the same keys.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "KEY_BYTES",
    "ChunkKey",
    "Namespace",
    "chunk_keys",
    "token_bytes",
]

KEY_BYTES = 32
DEFAULT_CHUNK_TOKENS = 256

ChunkKey = NewType("ChunkKey", bytes)

# Domain tags. Changing the encoding means bumping the version, which moves every key (an old
# cache then simply misses instead of serving KV computed under different rules).
_NAMESPACE_TAG = b"kvcache-ns-v1"
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
    kv_layout: str = "layers,2,tokens,kv_heads,head_dim"
    kv_dtype: str = "float16"
    world_size: int = 1
    rank: int = 0
    tenant_salt: bytes = b""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("namespace model must be non-empty")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if not isinstance(self.tenant_salt, bytes):
            raise ValueError("tenant_salt must be bytes")

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
            ]
        )

    def root_key(self) -> ChunkKey:
        """key(-1): the parent of chunk 0, so every chain starts inside its namespace."""
        return _hash(self.canonical_bytes())


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
