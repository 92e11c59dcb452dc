"""The block-hash self-check against engines' stored blocks, hashed by vLLM's own rules
(`block_hash.block_hashes`, checked against real vLLM in test_vllm_routing.py)."""

from __future__ import annotations

import logging

from kvcache.router.block_hash import BlockHasher, block_hashes
from kvcache.router.hash_check import MISMATCH_AFTER, HashCheck
from kvcache.router.kv_events import BlockStored, EventBatch

BLOCK = 16


def first_blocks(prompt: list[int], seed: str = "0", block_size: int = BLOCK) -> EventBatch:
    hashes = tuple(block_hashes(prompt, block_size, seed))
    stored = BlockStored(hashes, None, tuple(prompt[: len(hashes) * block_size]), block_size)
    return EventBatch(0, 0.0, (stored,))


def test_an_engine_hashing_alike_is_ok_from_its_first_prompt():
    check = HashCheck(BlockHasher(BLOCK, "0"))
    assert check.verdict("a") == "unchecked"
    check.observe("a", first_blocks(list(range(40))))
    assert check.verdicts() == {"a": "ok"}


def test_another_seed_is_a_mismatch_after_enough_prompts_and_logged_once(caplog):
    check = HashCheck(BlockHasher(BLOCK, "0"))
    with caplog.at_level(logging.WARNING, logger="kvcache.router.hash_check"):
        for prompt in range(MISMATCH_AFTER + 3):
            assert check.verdict("b") == ("mismatch" if prompt >= MISMATCH_AFTER else "unchecked")
            check.observe("b", first_blocks([prompt] * 40, seed="42"))
    assert check.verdict("b") == "mismatch"
    assert [r.message.count("PYTHONHASHSEED=0") for r in caplog.records] == [1]


def test_another_block_size_is_a_mismatch_at_once():
    check = HashCheck(BlockHasher(BLOCK, "0"))
    check.observe("c", first_blocks(list(range(300)), block_size=128))
    assert check.verdict("c") == "mismatch"


def test_blocks_with_a_parent_or_an_adapter_prove_nothing():
    check = HashCheck(BlockHasher(BLOCK, "0"))
    prompt = list(range(40))
    hashes = tuple(block_hashes(prompt, BLOCK, "0"))
    later = BlockStored(hashes[1:], hashes[0], tuple(prompt[BLOCK : 2 * BLOCK]), BLOCK)
    adapted = BlockStored((7,), None, tuple(prompt[:BLOCK]), BLOCK, lora_id=3)
    for _ in range(2 * MISMATCH_AFTER):
        check.observe("d", EventBatch(0, 0.0, (later, adapted)))
    assert check.verdict("d") == "unchecked"
