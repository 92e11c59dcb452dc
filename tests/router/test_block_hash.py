"""The router's block hashes equal vLLM's own: its request block hasher with `sha256_cbor`, its
NONE_HASH seeded from PYTHONHASHSEED, and its conversion to the hashes KV events publish."""

from __future__ import annotations

import random

import pytest

from kvcache.router.block_hash import (
    VLLM_DEFAULT_HASH_SEED,
    block_digests,
    block_hashes,
    root_digest,
)

kv_cache_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256_cbor  # noqa: E402
from vllm.v1.request import Request  # noqa: E402


@pytest.fixture(autouse=True)
def restore_vllms_none_hash(monkeypatch):
    """`init_none_hash` sets module globals of vLLM's: each test puts them back."""
    for name in ("NONE_HASH", "_NONE_HASH_SEED"):
        monkeypatch.setattr(
            kv_cache_utils, name, getattr(kv_cache_utils, name, None), raising=False
        )


def vllm_block_hashes(
    monkeypatch: pytest.MonkeyPatch, tokens: list[int], block_size: int, seed: str | None
) -> list[bytes]:
    """What a vLLM engine started with this PYTHONHASHSEED (None: unset) computes for a
    request."""
    if seed is None:
        monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    else:
        monkeypatch.setenv("PYTHONHASHSEED", seed)
    kv_cache_utils.init_none_hash(sha256_cbor)
    hasher = kv_cache_utils.get_request_block_hasher(block_size, sha256_cbor)
    request = Request("r", tokens, SamplingParams(max_tokens=1), None, block_hasher=hasher)
    return list(request.block_hashes)


def token_sequences() -> list[list[int]]:
    rng = random.Random(7)
    return [
        [rng.randrange(32_000) for _ in range(300)],
        # every CBOR integer width: 1, 2, 3, 5 and 9 bytes
        [0, 23, 24, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32, 2**40] * 13,
        [rng.randrange(152_000) for _ in range(1_000)],
    ]


@pytest.mark.parametrize("seed", ["0", "12345", "not-a-number", None])
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_block_hashes_equal_vllms(monkeypatch, block_size, seed):
    for tokens in token_sequences():
        expected = vllm_block_hashes(monkeypatch, tokens, block_size, seed)
        ours = block_digests(tokens, block_size, VLLM_DEFAULT_HASH_SEED if seed is None else seed)
        assert ours == expected
        published = [kv_cache_utils.maybe_convert_block_hash(digest) for digest in expected]
        assert block_hashes(tokens, block_size, seed or VLLM_DEFAULT_HASH_SEED) == published
        assert len(published) == len(tokens) // block_size  # full blocks only


def test_the_root_is_vllms_none_hash(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    kv_cache_utils.init_none_hash(sha256_cbor)
    assert root_digest("0") == kv_cache_utils.NONE_HASH


def test_a_short_prompt_has_no_blocks_and_the_seed_matters():
    assert block_hashes(list(range(15)), 16, "0") == []
    assert block_hashes(list(range(32)), 16, "0") != block_hashes(list(range(32)), 16, "1")
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0, "0")
