"""Tokenizing per cached segment gives exactly the tokenizer's ids, or is refused: SmolLM2's real
tokenizer on generated texts and rendered chats, and small trained tokenizers for the kinds whose
pieces depend on their place in the text."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as Backend

from kvcache.router.block_hash import BlockHasher, block_hashes
from kvcache.router.segment_tokens import SegmentTokenizer, separable
from kvcache.router.tokenize import Tokenizer

CORPUS = ["Hello there, general Kenobi!", "▁the quick brown fox 12345", "étés été\n\n  x\ty"] * 20


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    from kvcache.connector.smollm2 import GGUF_FILE, model_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(model_dir(), gguf_file=GGUF_FILE).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def smollm2(smollm2_dir) -> Tokenizer:
    return Tokenizer(str(smollm2_dir))


ADDED = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
text_parts = st.one_of(
    st.sampled_from(ADDED),
    st.text(max_size=40),
    st.sampled_from([" ", "\n", "\n\n", "  ", "12", "é", "Hello", "<|im_", "end|>", "<|"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(text_parts, max_size=12))
def test_segments_give_the_tokenizers_ids_on_any_text(smollm2, parts):
    text = "".join(parts)
    assert smollm2._segments is not None  # SmolLM2's byte-level BPE is separable
    expected = smollm2._tokenizer.encode(text, add_special_tokens=False)
    assert smollm2.encode(text, add_special_tokens=False) == expected
    assert smollm2.encode(text, add_special_tokens=False) == expected  # now from the cache
    assert smollm2.encode(text, add_special_tokens=True) == smollm2._tokenizer.encode(text)


def test_growing_chats_give_the_templates_ids(smollm2):
    rng = random.Random(5)
    words = ["alpha", "beta", "  gamma", "δέλτα", "12", "\n", "<|im_end|>", "e.g.", "don't"]
    messages = [{"role": "system", "content": "You are terse.\n"}]
    for turn in range(24):
        role = "user" if turn % 2 == 0 else "assistant"
        messages.append({"role": role, "content": " ".join(rng.choices(words, k=60))})
        for switches in ({}, {"add_generation_prompt": False, "continue_final_message": True}):
            payload = {"messages": messages, **switches}
            expected = smollm2._tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=False,
                add_generation_prompt=switches.get("add_generation_prompt", True),
                continue_final_message=switches.get("continue_final_message", False),
            )  # fmt: skip
            assert smollm2.chat_token_ids(payload) == list(expected)


def test_the_cache_stays_within_its_budget_and_keeps_recent_pieces(smollm2_dir):
    backend = Backend.from_file(str(smollm2_dir / "tokenizer.json"))
    segments = SegmentTokenizer(backend, capacity_chars=8_000)
    system = "<|im_start|>system\nYou are a helpful assistant with a long brief.<|im_end|>\n"
    for number in range(200):
        text = f"{system}<|im_start|>user\nquestion {number} " + "x" * 90 + "<|im_end|>\n"
        assert segments.encode(text) == backend.encode(text, add_special_tokens=False).ids
        assert segments.cached_chars <= 8_000
    assert "system\nYou are a helpful assistant with a long brief." in segments._pieces
    huge = "y " * 1_500  # more than an eighth of the budget: tokenized, never cached
    assert segments.encode(huge) == backend.encode(huge, add_special_tokens=False).ids
    assert huge not in segments._pieces


def trained(pre_tokenizer, normalizer=None, added: list[AddedToken] | None = None) -> Backend:
    backend = Backend(models.BPE(unk_token="[UNK]"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]"])
    )
    backend.add_special_tokens(added or [AddedToken("<s>", special=True, normalized=False)])
    return backend


def piecewise_differs(backend: Backend, text: str) -> bool:
    """Whether tokenizing `text`'s pieces apart would give other ids than the whole text."""
    first, second = text.split("<s>")
    apart = backend.encode_batch([first, second], add_special_tokens=False)
    whole = backend.encode(text, add_special_tokens=False).ids
    return apart[0].ids + [backend.token_to_id("<s>")] + apart[1].ids != whole


@pytest.mark.parametrize(
    ("backend", "reason"),
    [
        (trained(pre_tokenizers.Metaspace(prepend_scheme="first")), "Metaspace"),
        (
            trained(
                pre_tokenizers.Sequence(
                    [pre_tokenizers.Digits(), pre_tokenizers.Metaspace(prepend_scheme="first")]
                )
            ),
            "Metaspace",
        ),  # fmt: skip
        (
            trained(
                pre_tokenizers.Whitespace(),
                added=[AddedToken("<s>", special=True, normalized=False, lstrip=True)],
            ),
            "strips",
        ),  # fmt: skip
        (
            trained(
                pre_tokenizers.Whitespace(),
                normalizer=normalizers.Lowercase(),
                added=[AddedToken("<S>", special=False, normalized=True)],
            ),
            "after normalization",
        ),  # fmt: skip
    ],
)
def test_tokenizers_whose_pieces_depend_on_their_place_are_refused(backend, reason):
    assert reason in separable(backend)
    with pytest.raises(ValueError, match="cannot be cached per segment"):
        SegmentTokenizer(backend)


def test_the_refusals_are_needed():
    """Llama 2's Metaspace marks only the text's start: its second piece would gain a '▁'."""
    first = trained(pre_tokenizers.Metaspace(prepend_scheme="first"))
    assert piecewise_differs(first, "the fox<s>quick brown")
    always = trained(pre_tokenizers.Metaspace(prepend_scheme="always"))
    assert separable(always) is None
    assert not piecewise_differs(always, "the fox<s>quick brown")
    regex = trained(pre_tokenizers.Split(Regex(r"\s+|\d"), behavior="isolated"))
    text = "the fox <s>  12 quick<s><s>brown "
    assert SegmentTokenizer(regex).encode(text) == regex.encode(text, add_special_tokens=False).ids


def test_special_tokens_encoded_as_text_are_refused(smollm2_dir):
    backend = Backend.from_file(str(smollm2_dir / "tokenizer.json"))
    backend.encode_special_tokens = True
    assert "encode_special_tokens" in separable(backend)


def test_hashing_from_memory_equals_hashing_afresh():
    rng = random.Random(2)
    hasher = BlockHasher(16, "0", capacity_blocks=40)
    shared = [rng.randrange(50_000) for _ in range(320)]
    for _ in range(30):
        tokens = shared[: rng.randrange(320)] + [rng.randrange(50_000) for _ in range(200)]
        assert hasher.hashes(tokens) == block_hashes(tokens, 16, "0")
        assert len(hasher._digests) <= 40
    with pytest.raises(ValueError):
        BlockHasher(0, "0")


def test_a_sampled_check_turns_off_a_cache_that_gives_other_ids(smollm2_dir):
    tokenizer = Tokenizer(str(smollm2_dir))
    tokenizer.verify_every = 4
    text = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
    expected = tokenizer._tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.encode(text, add_special_tokens=False) == expected
    tokenizer._segments._pieces["user\nHi there"] = [0]  # a cache gone wrong
    answers = [tokenizer.encode(text, add_special_tokens=False) for _ in range(3)]
    assert all(answer != expected for answer in answers[:2])  # unchecked: the cache's word...
    assert answers[2] == expected  # ...until the sampled check, which turns it off
    assert tokenizer._segments is None
    assert tokenizer.encode(text, add_special_tokens=True) == tokenizer._tokenizer.encode(text)
