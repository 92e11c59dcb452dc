"""vLLM's prefix-cache block hashes, computed outside vLLM, so the router can hash a tokenized
request exactly as the engine will and look the hashes up in the prefix index.

This reproduces `hash_block_tokens` with `sha256_cbor` (`vllm/v1/core/kv_cache_utils.py`): block i
hashes the CBOR (canonical) encoding of `(parent digest, token ids of block i, extra keys)` with
SHA-256, where the first block's parent is `NONE_HASH = sha256(cbor(seed))` and the seed is the
engine's `PYTHONHASHSEED` (vLLM 0.32 falls back to `"vllm-none-hash"` when it is unset). Only plain
text prompts are covered: LoRA, multimodal inputs and `cache_salt` add extra keys, and vLLM's
default `sha256` algorithm pickles, which no other process can reproduce, so engines run with
`--prefix-caching-hash-algo sha256_cbor`.
"""

from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import cbor2

# vLLM's seed for NONE_HASH when PYTHONHASHSEED is unset and the hash is cryptographic.
VLLM_DEFAULT_HASH_SEED = "vllm-none-hash"

_LOW_64 = (1 << 64) - 1


def low_64_bits(digest: bytes) -> int:
    """The block hash as vLLM publishes it in KV events (`maybe_convert_block_hash`): the digest
    read big-endian, keeping its low 64 bits."""
    return int.from_bytes(digest, "big") & _LOW_64


@functools.lru_cache(maxsize=16)
def root_digest(hash_seed: str) -> bytes:
    """vLLM's NONE_HASH: the parent digest of every prompt's first block."""
    return hashlib.sha256(cbor2.dumps(hash_seed, canonical=True)).digest()


def block_digest(parent: bytes, block: tuple[int, ...], extra: tuple | None = None) -> bytes:
    """One block's digest: SHA-256 over the canonical CBOR of (parent, tokens, extra keys)."""
    return hashlib.sha256(cbor2.dumps((parent, block, extra), canonical=True)).digest()


def salt_keys(cache_salt: str | None) -> tuple | None:
    """vLLM's extra keys of a prompt's first block for a request with a `cache_salt`
    (`generate_block_hash_extra_keys`); the later blocks carry it through their parents."""
    return (("cache_salt", cache_salt),) if cache_salt else None


def _check_block_size(block_size: int) -> None:
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, not {block_size}")


def block_digests(
    token_ids: Sequence[int], block_size: int, hash_seed: str, cache_salt: str | None = None
) -> list[bytes]:
    """The full 32-byte digest of each full block of `token_ids` (a partial last block has none,
    as in vLLM)."""
    _check_block_size(block_size)
    parent = root_digest(hash_seed)
    digests: list[bytes] = []
    extra = salt_keys(cache_salt)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_digest(parent, tuple(token_ids[start : start + block_size]), extra)
        extra = None
        digests.append(parent)
    return digests


def block_hashes(
    token_ids: Sequence[int], block_size: int, hash_seed: str, cache_salt: str | None = None
) -> list[int]:
    """The hashes vLLM publishes for the full blocks of `token_ids`: what `PrefixIndex.match`
    takes."""
    digests = block_digests(token_ids, block_size, hash_seed, cache_salt)
    return [low_64_bits(digest) for digest in digests]


class BlockHasher:
    """`block_hashes` for one engine configuration, remembering each block's digest by its parent
    and tokens: a conversation's next turn re-hashes only its new blocks (SHA-256 over CBOR is
    ~2.5 µs a block; a lookup, a tenth of that). Holds up to `capacity_blocks` digests, least
    recently used out first."""

    def __init__(self, block_size: int, hash_seed: str, capacity_blocks: int = 262_144) -> None:
        _check_block_size(block_size)
        self.block_size = block_size
        self.hash_seed = hash_seed
        self.capacity_blocks = capacity_blocks
        self._digests: OrderedDict[tuple[bytes, tuple[int, ...], tuple | None], tuple[bytes, int]]
        self._digests = OrderedDict()

    def hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        digests, size = self._digests, self.block_size
        parent = root_digest(self.hash_seed)
        hashes: list[int] = []
        extra = salt_keys(cache_salt)
        for start in range(0, len(token_ids) - size + 1, size):
            key = (parent, tuple(token_ids[start : start + size]), extra)
            extra = None
            known = digests.get(key)
            if known is None:
                digest = block_digest(*key)
                known = digests[key] = (digest, low_64_bits(digest))
                if len(digests) > self.capacity_blocks:
                    digests.popitem(last=False)
            else:
                digests.move_to_end(key)
            parent = known[0]
            hashes.append(known[1])
        return hashes
