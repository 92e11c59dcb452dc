"""The entropy stages: lossless on any codes, ANS within a hair of the empirical entropy, and
damaged input refused with CorruptBlob."""

from __future__ import annotations

import numpy as np
import pytest

from kvcache.kernels.blob import CorruptBlob
from kvcache.kernels.entropy import STAGES, compress, decompress


def skewed_codes(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.normal(31, 2.0, count)), 0, 62).astype(np.uint8)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("sizes", [[0, 0], [1, 0], [5000, 3000], [7]])
def test_every_stage_is_lossless(stage, sizes):
    parts = [skewed_codes(size, seed) for seed, size in enumerate(sizes)]
    parts[0][:1] = 255  # the largest code
    back = decompress(stage, memoryview(compress(stage, parts)), sizes)
    assert [part.tolist() for part in back] == [part.tolist() for part in parts]


def test_ans_comes_within_half_a_percent_of_the_entropy_and_beats_zstd():
    codes = skewed_codes(200_000, 0)
    counts = np.bincount(codes)
    p = counts[counts > 0] / codes.size
    entropy_bytes = -(p * np.log2(p)).sum() * codes.size / 8
    ans = len(compress("ans", [codes]))
    assert ans < entropy_bytes * 1.005 + 2048
    assert ans < len(compress("zstd", [codes]))


@pytest.mark.parametrize("stage", ["ans", "zstd"])
def test_damage_raises_corrupt_blob(stage):
    data = compress(stage, [skewed_codes(4000, 1), skewed_codes(4000, 2)])
    for damaged in (data[:-4], data + b"\0\0\0\0", data[:12]):
        with pytest.raises(CorruptBlob):
            decompress(stage, memoryview(damaged), [4000, 4000])
