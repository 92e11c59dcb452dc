"""The `int8` codec: symmetric absmax quantization of keys and values to int8, half the bytes of
fp16 plus a few scales.

Keys and values each choose where their scales live: per channel (one scale per layer, head and
head_dim channel, over all tokens: keys have outlier channels, so this keeps their error small)
or per token (one scale per layer and token over all heads and channels: values vary by token).
Scales are float32; the code of element x is round(x / scale) clamped to [-127, 127], with
scale = absmax / 127 over the scale's group (a group of zeros gets scale 1). This module is the
torch reference; kernels for the hot loops are compared against it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from kvcache.kernels.blob import BlobHeader, CorruptBlob
from kvcache.kernels.codec import DTYPES, body_tensor, register, tensor_bytes

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
        key_codes, key_scale = quantize_reference(kv[:, 0], self.key_scales)
        value_codes, value_scale = quantize_reference(kv[:, 1], self.value_scales)
        body = b"".join(
            tensor_bytes(part) for part in (key_codes, value_codes, key_scale, value_scale)
        )
        return {"k": self.key_scales, "v": self.value_scales}, body

    @classmethod
    def decode_body(cls, header: BlobHeader, body: memoryview) -> torch.Tensor:
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
        key_codes = body_tensor(body, 0, codes, torch.int8).reshape(slice_shape)
        value_codes = body_tensor(body, codes, codes, torch.int8).reshape(slice_shape)
        key_scale = body_tensor(body, 2 * codes, scale_counts[0], torch.float32)
        value_scale = body_tensor(body, 2 * codes + 4 * scale_counts[0], scale_counts[1],
                                  torch.float32)  # fmt: skip
        return torch.stack(
            [
                dequantize_reference(key_codes, key_scale.reshape(scale_shapes[0]), dtype),
                dequantize_reference(value_codes, value_scale.reshape(scale_shapes[1]), dtype),
            ],
            dim=1,
        )
