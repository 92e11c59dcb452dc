"""Triton kernels for `cachegen`'s hot paths: quantize + pack, and unpack + dequantize.

Each program works on one stream (K or V, layer, head) and a block of its packed bytes or codes,
so every stream keeps its own bit width and scales. Packing gathers the 8 bits of each output
byte from the codes they come from (a code of width w spans bits i*w .. i*w + w - 1), computing
the code on the fly from the KV, so codes never round-trip through memory; unpacking gathers the
w bits of each code. The arithmetic is the reference's (`cachegen.py`) step for step, in float32
with correctly rounded division, round-half-to-even and no fused multiply-add, so the bytes and
the decoded KV match it bit for bit (tests run both through Triton's interpreter on the CPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcache.kernels.bitpack import stream_offsets
from kvcache.kernels.triton_math import round_half_even, store_as

_BLOCK = 256


@triton.jit
def _stream(bits_ptr, width_ptr, layers, heads):
    """This program's stream (axis 0: K or V, layer, head, in that order), its bit width and
    its packed width."""
    stream = tl.program_id(0)
    bits = tl.load(bits_ptr + stream)
    width = tl.load(width_ptr + stream)
    return (
        stream,
        stream // (layers * heads),
        (stream // heads) % layers,
        stream % heads,
        bits,
        width,
    )


@triton.jit
def _quantize_pack_kernel(
    src_ptr, lo_ptr, key_step_ptr, value_step_ptr, bits_ptr, width_ptr, offset_ptr, out_ptr,
    layers, tokens, heads, head_dim, groups, key_group, BLOCK: tl.constexpr,
):  # fmt: skip
    stream, slot, layer, head, bits, width = _stream(bits_ptr, width_ptr, layers, heads)
    count = tokens * head_dim
    byte = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_stream = byte < (count * width + 7) // 8
    levels = ((1 << bits) - 1).to(tl.float32)
    qmax = ((1 << (bits - 1)) - 1).to(tl.float32)
    packed = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(8):
        bit = byte * 8 + k
        index = bit // width
        valid = in_stream & (index < count)
        token = index // head_dim
        channel = index % head_dim
        at = (((layer * 2 + slot) * tokens + token) * heads + head) * head_dim + channel
        x = tl.load(src_ptr + at, mask=valid, other=0.0).to(tl.float32)
        if slot == 0:
            p = ((layer * groups + token // key_group) * heads + head) * head_dim + channel
            lo = tl.load(lo_ptr + p, mask=valid, other=0.0)
            step = tl.load(key_step_ptr + p, mask=valid, other=1.0)
            code = round_half_even(tl.math.div_rn(x - lo, step))
            code = tl.minimum(tl.maximum(code, 0.0), levels)
        else:
            step = tl.load(value_step_ptr + (layer * tokens + token) * heads + head,
                           mask=valid, other=1.0)  # fmt: skip
            code = round_half_even(tl.math.div_rn(x, step))
            code = tl.minimum(tl.maximum(code, -qmax), qmax) + qmax
        code = tl.where(valid, code.to(tl.int32), 0)
        packed = packed | (((code >> (bit % width)) & 1) << k)
    offset = tl.load(offset_ptr + stream)
    tl.store(out_ptr + offset + byte, packed.to(tl.uint8), mask=in_stream)


@triton.jit
def _unpack_dequantize_kernel(
    packed_ptr, lo_ptr, key_step_ptr, value_step_ptr, bits_ptr, width_ptr, offset_ptr, out_ptr,
    layers, tokens, heads, head_dim, groups, key_group,
    OUT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    stream, slot, layer, head, bits, width = _stream(bits_ptr, width_ptr, layers, heads)
    offset = tl.load(offset_ptr + stream)
    count = tokens * head_dim
    index = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = index < count
    code = tl.zeros([BLOCK], dtype=tl.int32)
    for k in tl.static_range(8):
        bit = index * width + k
        in_code = tl.full([BLOCK], k, tl.int32) < width
        byte = tl.load(packed_ptr + offset + bit // 8, mask=valid & in_code, other=0)
        code = code | (((byte.to(tl.int32) >> (bit % 8)) & 1) << k)
    token = index // head_dim
    channel = index % head_dim
    if slot == 0:
        p = ((layer * groups + token // key_group) * heads + head) * head_dim + channel
        lo = tl.load(lo_ptr + p, mask=valid, other=0.0)
        step = tl.load(key_step_ptr + p, mask=valid, other=1.0)
        value = code.to(tl.float32) * step + lo
    else:
        qmax = ((1 << (bits - 1)) - 1).to(tl.float32)
        step = tl.load(value_step_ptr + (layer * tokens + token) * heads + head,
                       mask=valid, other=1.0)  # fmt: skip
        value = (code.to(tl.float32) - qmax) * step
    target = (((layer * 2 + slot) * tokens + token) * heads + head) * head_dim + channel
    store_as(out_ptr + target, value, valid, OUT_BF16)


def _stream_args(bits: torch.Tensor, widths: list[int], count: int):
    device = bits.device
    offsets = stream_offsets(count, widths)
    return (
        bits.flatten().to(torch.int32).contiguous(),
        torch.tensor(widths, dtype=torch.int32, device=device),
        torch.tensor(offsets[:-1], dtype=torch.int64, device=device),
        offsets[-1],
    )


def quantize_pack(source, lo, key_step, value_step, bits, widths, key_group) -> torch.Tensor:
    """The packed codes of KV `source` (contiguous `[layers, 2, tokens, heads, head_dim]`): the
    Triton twin of `pack_reference(quantize_reference(...), widths)`."""
    layers, _, tokens, heads, head_dim = source.shape
    count = tokens * head_dim
    bits_flat, width_t, offset_t, total = _stream_args(bits, widths, count)
    out = torch.empty(total, dtype=torch.uint8, device=source.device)
    most = max(stream_offsets(count, [width])[-1] for width in set(widths))
    if most == 0:
        return out
    grid = (len(widths), triton.cdiv(most, _BLOCK))
    _quantize_pack_kernel[grid](
        source, lo.contiguous(), key_step.contiguous(), value_step.contiguous(),
        bits_flat, width_t, offset_t, out,
        layers, tokens, heads, head_dim, lo.shape[1], key_group,
        BLOCK=_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def unpack_dequantize(
    packed, lo, key_step, value_step, bits, widths, key_group, shape, dtype
) -> torch.Tensor:
    """KV `shape` in `dtype` from packed codes: the Triton twin of
    `dequantize_reference(unpack_reference(...), ...)`."""
    layers, _, tokens, heads, head_dim = shape
    count = tokens * head_dim
    bits_flat, width_t, offset_t, _ = _stream_args(bits, widths, count)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if count == 0 or layers * heads == 0:
        return out
    grid = (len(widths), triton.cdiv(count, _BLOCK))
    _unpack_dequantize_kernel[grid](
        packed, lo.contiguous(), key_step.contiguous(), value_step.contiguous(),
        bits_flat, width_t, offset_t, out,
        layers, tokens, heads, head_dim, lo.shape[1], key_group,
        OUT_BF16=dtype == torch.bfloat16, BLOCK=_BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out
