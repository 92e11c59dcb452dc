"""Triton helpers that make kernels round exactly as torch does, on every backend, so kernel and
torch reference agree bit for bit."""

from __future__ import annotations

import triton
import triton.language as tl

# Adding and subtracting 1.5 * 2**23 rounds a float32 of magnitude < 2**22 to an integer, ties to
# even, as torch.round does (callers clamp larger magnitudes to their code range anyway).
_ROUNDER = 12582912.0


@triton.jit
def round_half_even(y):
    return (y + _ROUNDER) - _ROUNDER


@triton.jit
def store_as(out_ptr, value, mask, OUT_BF16: tl.constexpr):
    """Store float32 `value` in the output's dtype, rounding to nearest even. bfloat16 is rounded
    by hand: Triton's interpreter truncates float32 to bfloat16."""
    if OUT_BF16:
        raw = value.to(tl.uint32, bitcast=True)
        raw = (raw + 0x7FFF + ((raw >> 16) & 1)) >> 16
        tl.store(out_ptr, raw.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr, value.to(out_ptr.dtype.element_ty), mask=mask)
