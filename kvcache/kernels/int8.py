"""The `int8` codec: symmetric absmax quantization of keys and values to int8, half the bytes of
fp16 plus a few scales.

Keys and values each choose where their scales live: per channel (one scale per layer, head and
head_dim channel, over all tokens: keys have outlier channels, so this keeps their error small)
or per token (one scale per layer and token over all heads and channels: values vary by token).
Scales are float32; the code of element x is round(x / scale) clamped to [-127, 127], with
scale = absmax / 127 over the scale's group (a group of zeros gets scale 1), rounding half to
even. The torch reference and the Triton kernels compute exactly this, in float32 with correctly
rounded division, so they agree bit for bit; the codec runs the kernels on CUDA tensors and the
reference elsewhere (tests run the kernels on the CPU through Triton's interpreter).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import triton
import triton.language as tl

from kvcache.kernels.blob import BlobHeader, CorruptBlob
from kvcache.kernels.codec import DTYPES, body_tensor, register, tensor_bytes
from kvcache.kernels.triton_math import round_half_even, store_as

QMAX = 127
SCALE_LAYOUTS = ("channel", "token")
# Dimensions of one K or V slice [layers, tokens, heads, head_dim] that a scale spans.
_REDUCED = {"channel": (1,), "token": (2, 3)}


def scale_shape(layout: str, layers: int, tokens: int, heads: int, head_dim: int) -> tuple:
    if layout == "channel":
        return (layers, 1, heads, head_dim)
    return (layers, tokens, 1, 1)


def quantize_reference(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 scales of one K or V slice `[layers, tokens, heads, head_dim]`."""
    values = x.float()
    if values.numel() == 0:  # no tokens: nothing to reduce over, scales of 1
        return values.to(torch.int8), torch.ones(scale_shape(layout, *values.shape))
    absmax = values.abs().amax(dim=_REDUCED[layout], keepdim=True)
    scale = torch.where(absmax > 0, absmax / QMAX, torch.ones_like(absmax))
    codes = torch.round(values / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def dequantize_reference(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    return (codes.float() * scale).to(dtype)


_BLOCK_ROW = 256
_BLOCK_TOKENS = 16
_BLOCK_CHANNELS = 64
_BLOCK_ELEMENTS = 1024


@triton.jit
def _codes_of(x, scale):
    y = tl.math.div_rn(x, scale)
    rounded = round_half_even(y)
    return tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8)


@triton.jit
def _quantize_tokens_kernel(
    kv_ptr, codes_ptr, scale_ptr, slot, tokens, row_size, BLOCK: tl.constexpr
):
    """One program per (layer, token) of K (slot 0) or V (slot 1): one scale over the row."""
    row = tl.program_id(0)
    layer = row // tokens
    source = ((layer * 2 + slot) * tokens + row % tokens) * row_size
    absmax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, row_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = tl.load(kv_ptr + source + offsets, mask=offsets < row_size, other=0.0)
        absmax = tl.maximum(absmax, tl.abs(x.to(tl.float32)))
    peak = tl.max(absmax, axis=0)
    scale = tl.where(peak > 0, tl.math.div_rn(peak, 127.0), 1.0)
    tl.store(scale_ptr + row, scale)
    for start in range(0, row_size, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        mask = offsets < row_size
        x = tl.load(kv_ptr + source + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(codes_ptr + row * row_size + offsets, _codes_of(x, scale), mask=mask)


@triton.jit
def _quantize_channels_kernel(
    kv_ptr, codes_ptr, scale_ptr, slot, tokens, row_size,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One program per (layer, block of channels) of K or V: one scale per channel over all
    tokens, so each tile is read twice (absmax, then codes)."""
    layer = tl.program_id(0)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < row_size
    source = (layer * 2 + slot) * tokens * row_size
    target = layer * tokens * row_size
    absmax = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, tokens, BLOCK_T):
        token = start + tl.arange(0, BLOCK_T)
        mask = (token[:, None] < tokens) & channel_mask[None, :]
        at = token[:, None] * row_size + channels[None, :]
        x = tl.load(kv_ptr + source + at, mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=0))
    scale = tl.where(absmax > 0, tl.math.div_rn(absmax, 127.0), 1.0)
    tl.store(scale_ptr + layer * row_size + channels, scale, mask=channel_mask)
    for start in range(0, tokens, BLOCK_T):
        token = start + tl.arange(0, BLOCK_T)
        mask = (token[:, None] < tokens) & channel_mask[None, :]
        at = token[:, None] * row_size + channels[None, :]
        x = tl.load(kv_ptr + source + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(codes_ptr + target + at, _codes_of(x, scale[None, :]), mask=mask)


@triton.jit
def _dequantize_kernel(
    codes_ptr, scale_ptr, out_ptr, slot, tokens, row_size, total,
    PER_TOKEN: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """codes * scale into K (slot 0) or V (slot 1) of the output tensor, in its dtype."""
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < total
    layer = index // (tokens * row_size)
    if PER_TOKEN:
        scale_index = index // row_size
    else:
        scale_index = layer * row_size + index % row_size
    codes = tl.load(codes_ptr + index, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + scale_index, mask=mask, other=1.0)
    target = layer * 2 * tokens * row_size + slot * tokens * row_size + index % (tokens * row_size)
    value = codes * scale
    store_as(out_ptr + target, value, mask, OUT_BF16)


def quantize_kernel(kv: torch.Tensor, slot: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton twin of `quantize_reference(kv[:, slot], layout)` (kv contiguous)."""
    layers, _, tokens, heads, head_dim = kv.shape
    row_size = heads * head_dim
    codes = torch.empty((layers, tokens, heads, head_dim), dtype=torch.int8, device=kv.device)
    shape = scale_shape(layout, layers, tokens, heads, head_dim)
    scale = torch.ones(shape, dtype=torch.float32, device=kv.device)
    if codes.numel() == 0:
        return codes, scale
    if layout == "token":
        _quantize_tokens_kernel[(layers * tokens,)](
            kv, codes, scale, slot, tokens, row_size, BLOCK=_BLOCK_ROW
        )
    else:
        grid = (layers, triton.cdiv(row_size, _BLOCK_CHANNELS))
        _quantize_channels_kernel[grid](
            kv, codes, scale, slot, tokens, row_size,
            BLOCK_T=_BLOCK_TOKENS, BLOCK_C=_BLOCK_CHANNELS,
        )  # fmt: skip
    return codes, scale


def dequantize_kernel(
    codes: torch.Tensor, scale: torch.Tensor, layout: str, slot: int, out: torch.Tensor
) -> None:
    """The Triton twin of `dequantize_reference`, writing K or V of `out` in place."""
    layers, tokens, heads, head_dim = codes.shape
    total = codes.numel()
    if total == 0:
        return
    _dequantize_kernel[(triton.cdiv(total, _BLOCK_ELEMENTS),)](
        codes, scale, out, slot, tokens, heads * head_dim, total,
        PER_TOKEN=layout == "token", OUT_BF16=out.dtype == torch.bfloat16, BLOCK=_BLOCK_ELEMENTS,
    )  # fmt: skip


@register
class Int8Codec:
    name: ClassVar[str] = "int8"
    version: ClassVar[int] = 1

    def __init__(self, key_scales: str = "channel", value_scales: str = "token") -> None:
        for layout in (key_scales, value_scales):
            if layout not in SCALE_LAYOUTS:
                raise ValueError(f"scale layout must be one of {SCALE_LAYOUTS}, got {layout!r}")
        self.key_scales = key_scales
        self.value_scales = value_scales

    def encode_body(self, kv: torch.Tensor) -> tuple[dict[str, Any], bytes]:
        if kv.is_cuda:
            kv = kv.contiguous()
            key_codes, key_scale = quantize_kernel(kv, 0, self.key_scales)
            value_codes, value_scale = quantize_kernel(kv, 1, self.value_scales)
        else:
            key_codes, key_scale = quantize_reference(kv[:, 0], self.key_scales)
            value_codes, value_scale = quantize_reference(kv[:, 1], self.value_scales)
        body = b"".join(
            tensor_bytes(part) for part in (key_codes, value_codes, key_scale, value_scale)
        )
        return {"k": self.key_scales, "v": self.value_scales}, body

    @classmethod
    def decode_body(
        cls, header: BlobHeader, body: memoryview, device: torch.device
    ) -> torch.Tensor:
        layouts = (header.params.get("k"), header.params.get("v"))
        if any(layout not in SCALE_LAYOUTS for layout in layouts):
            raise CorruptBlob(f"int8 scale layouts {layouts} are not among {SCALE_LAYOUTS}")
        layers, _, tokens, heads, head_dim = header.shape
        slice_shape = (layers, tokens, heads, head_dim)
        codes = layers * tokens * heads * head_dim
        scale_shapes = [scale_shape(layout, *slice_shape) for layout in layouts]
        scale_counts = [torch.Size(shape).numel() for shape in scale_shapes]
        if body.nbytes != 2 * codes + 4 * sum(scale_counts):
            raise CorruptBlob(f"{body.nbytes} body bytes do not fit int8 {list(header.shape)}")
        dtype = DTYPES[header.dtype]
        parts = [
            body_tensor(body, 0, codes, torch.int8).reshape(slice_shape),
            body_tensor(body, codes, codes, torch.int8).reshape(slice_shape),
            body_tensor(body, 2 * codes, scale_counts[0], torch.float32).reshape(scale_shapes[0]),
            body_tensor(
                body, 2 * codes + 4 * scale_counts[0], scale_counts[1], torch.float32
            ).reshape(scale_shapes[1]),
        ]
        key_codes, value_codes, key_scale, value_scale = (part.to(device) for part in parts)
        if device.type != "cuda":
            return torch.stack(
                [
                    dequantize_reference(key_codes, key_scale, dtype),
                    dequantize_reference(value_codes, value_scale, dtype),
                ],
                dim=1,
            )
        out = torch.empty(header.shape, dtype=dtype, device=device)
        dequantize_kernel(key_codes, key_scale, layouts[0], 0, out)
        dequantize_kernel(value_codes, value_scale, layouts[1], 1, out)
        return out
