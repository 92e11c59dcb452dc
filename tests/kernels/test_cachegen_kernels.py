"""cachegen's Triton kernels against the torch reference, bit for bit: packed bytes and decoded
KV, over widths 1..8 and mixed per-stream widths, key groups that do and do not divide the
tokens, every dtype, and no tokens. On the CPU they run through Triton's interpreter, so the
shapes stay small."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.bitpack import pack_reference, unpack_reference
from kvcache.kernels.cachegen import (
    bit_table,
    dequantize_reference,
    quantize_reference,
    scale_params,
)
from kvcache.kernels.cachegen_triton import quantize_pack, unpack_dequantize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (shape, key bits, value bits, key group): one element at the narrowest widths; odd sizes and a
# ragged key group; per-layer and per-head widths including 8; a single token; no tokens.
CASES = [
    ((1, 2, 1, 1, 1), 1, 2, 4),
    ((2, 2, 7, 3, 5), [3, 5], [[2, 4, 6], [8, 3, 5]], 3),
    ((1, 2, 16, 2, 8), 8, 8, 16),
    ((3, 2, 1, 1, 64), [4, 6, 7], 6, 64),
    ((1, 2, 0, 2, 8), 4, 6, 64),
]


def sample(shape, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sum(shape))
    kv = torch.randn(shape, generator=generator) * 2
    if shape[2] > 1:
        kv[0, 0, :, 0, 0] = 0.5  # a constant key channel: step 1, all codes 0
        kv[:, 1, 0] = 0.0  # an all-zero value row
        kv[:, 0, :, :, -1] += 40  # an offset key channel
        kv[:, 1, -1, 0, 0] = 60  # a value outlier
    return kv.to(dtype).to(DEVICE)


@pytest.mark.parametrize("entropy_width", [None, 8], ids=["packed", "bytes"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[str(case[0]) for case in CASES])
def test_kernels_match_the_reference_bit_for_bit(case, dtype, entropy_width):
    shape, key_bits, value_bits, key_group = case
    layers, _, tokens, heads, head_dim = shape
    kv = sample(shape, dtype)
    bits = bit_table(key_bits, value_bits, layers, heads).to(DEVICE)
    widths = bits.flatten().tolist() if entropy_width is None else [8] * bits.numel()
    x = kv.float()
    lo, key_step, value_step = scale_params(x, bits, key_group, value_step=1.0)

    packed = quantize_pack(kv, lo, key_step, value_step, bits, widths, key_group)
    codes = quantize_reference(x, lo, key_step, value_step, bits, key_group)
    assert torch.equal(packed.cpu(), pack_reference(codes, widths).cpu())

    decoded = unpack_dequantize(packed, lo, key_step, value_step, bits, widths, key_group, shape,
                                dtype)  # fmt: skip
    expected = dequantize_reference(
        unpack_reference(packed, widths, tokens * head_dim),
        lo, key_step, value_step, bits, key_group, shape, dtype,
    )  # fmt: skip
    assert torch.equal(decoded.cpu().view(torch.uint8), expected.cpu().view(torch.uint8))


def test_ties_round_to_even_in_both():
    # value step 1 (absmax 3 over qmax 3 at 3 bits): x / step lands exactly on .5
    row = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.0, 0.0], device=DEVICE)
    kv = torch.zeros((1, 2, 1, 1, 8), device=DEVICE)
    kv[0, 1, 0, 0] = row
    bits = bit_table(3, 3, 1, 1).to(DEVICE)
    lo, key_step, value_step = scale_params(kv, bits, 1, value_step=0.01)
    assert float(value_step) == 1.0
    codes = quantize_reference(kv, lo, key_step, value_step, bits, 1)
    packed = quantize_pack(kv, lo, key_step, value_step, bits, [8, 8], 1)
    expected = [3 + v for v in (0, 2, 2, 0, -2, -2, 3, 0)]  # offset by qmax = 3
    assert codes[1].tolist() == packed[8:].tolist() == expected
