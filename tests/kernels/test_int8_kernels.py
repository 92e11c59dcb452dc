"""The int8 Triton kernels against the torch reference, bit for bit, over shapes and dtypes
(including a single token, odd sizes, rows longer than a block, no tokens). On the CPU they run
through Triton's interpreter, so the shapes stay small."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.int8 import (
    dequantize_kernel,
    dequantize_reference,
    quantize_kernel,
    quantize_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# [layers, 2, tokens, heads, head_dim]: one element; one token; odd tokens and channels; rows of
# 300 (more than one 256-wide block) and 17 tokens (two token tiles); no tokens.
SHAPES = [(1, 2, 1, 1, 1), (2, 2, 1, 3, 64), (1, 2, 5, 1, 7), (2, 2, 17, 3, 100), (1, 2, 0, 2, 8)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def sample(shape, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(shape))
    kv = torch.randn(shape, generator=generator) * 2
    if shape[2]:
        kv[:, :, 0, 0, 0] = 0.0
        kv[0, 0, :, 0, 0] = 0.0  # a channel of zeros: scale 1
        kv[:, 0, :, :, -1] *= 30  # an outlier channel
    return kv.to(dtype).to(DEVICE)


@pytest.mark.parametrize("layout", ["token", "channel"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_and_dequantize_kernels_match_the_reference_bit_for_bit(shape, dtype, layout):
    kv = sample(shape, dtype)
    out = torch.full(shape, 99.0, dtype=dtype, device=DEVICE)
    for slot in (0, 1):
        codes, scale = quantize_kernel(kv, slot, layout)
        expected_codes, expected_scale = quantize_reference(kv[:, slot], layout)
        assert torch.equal(codes.cpu(), expected_codes.cpu())
        assert torch.equal(scale.cpu(), expected_scale.cpu().reshape(scale.shape))
        dequantize_kernel(codes, scale, layout, slot, out)
        expected = dequantize_reference(expected_codes, expected_scale, dtype)
        assert torch.equal(out[:, slot].cpu().view(torch.uint8), expected.cpu().view(torch.uint8))


def test_ties_round_to_even_in_both():
    # x / scale lands exactly on .5 for these values (scale 1 after absmax 127)
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5], device=DEVICE)
    kv = torch.zeros((1, 2, 1, 1, 8), device=DEVICE)
    kv[0, 0, 0, 0] = row
    codes, _ = quantize_kernel(kv, 0, "token")
    expected, _ = quantize_reference(kv[:, 0], "token")
    assert codes.flatten().tolist() == expected.flatten().tolist() == [127, 0, 2, 2, 0, -2, -2, 4]
