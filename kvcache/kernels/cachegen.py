"""The `cachegen` codec: quantization with per-layer, per-head bit widths, optional anchor tokens
with quantized deltas, bit packing, and an optional lossless entropy stage.

Codes are cut into streams, one per (K or V, layer, KV head), each with its own bit width `b`
(the `bits` table, `[2, layers, heads]`, stored in the header):
- keys: per channel, asymmetric over a group of `key_group` tokens: `lo` and `step` cover the
  group's range with 2**b - 1 steps (keys have channels with large offsets, so one scale over
  all channels would waste levels);
- values: per token and head, symmetric: `step = max(value_step * rms, absmax / (2**(b-1) - 1))`,
  codes clamped to +-(2**(b-1) - 1). Wide codes and an rms-relative step quantize the bulk of a
  value row coarsely and keep its outliers (which the model needs: clipping them cost far more
  quality than it saved); the absmax bound makes narrow codes range-based instead of clipping.
- anchors (`anchor_group` > 0): every group of tokens starts with an anchor token stored as int8
  (per channel); the group's other tokens are quantized as deltas against the decoded anchor.
- entropy stage (`entropy.py`): `ans` (default) codes one byte per code with an ANS coder and a
  table of symbol counts per K and V, within a fraction of a percent of the codes' entropy;
  `zstd` is faster and looser; `none` stores the codes bit packed at their stream's width.
Scale parameters are bfloat16 (their precision does not matter, only that encoder and decoder use
the same values: the encoder quantizes with the rounded ones, rounded outwards so the range is
still covered). The quantize + pack and unpack + dequantize steps are Triton kernels on CUDA
(`cachegen_triton.py`) and the torch reference below elsewhere; both compute in float32 with
correctly rounded division, so they agree bit for bit.

Defaults were chosen by measurement on SmolLM2-135M's KV (`benchmarks/codecs.py`,
`docs/benchmarks.md`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from kvcache.kernels import entropy as entropy_stages
from kvcache.kernels import int8
from kvcache.kernels.bitpack import pack_reference, stream_offsets, unpack_reference
from kvcache.kernels.blob import BlobHeader, CorruptBlob
from kvcache.kernels.codec import DTYPES, body_tensor, register, tensor_bytes

KEY_BITS = range(1, 9)
VALUE_BITS = range(2, 9)

# Scale-parameter sections of the body, in order: key lo, key step, value step (bfloat16 each).
_PARAM_DTYPE = torch.bfloat16


def bit_table(key_bits: int | Sequence, value_bits: int | Sequence, layers: int, heads: int):
    """The `[2, layers, heads]` int32 bit table from a width per K/V, or per layer, or per layer
    and head."""
    table = torch.empty((2, layers, heads), dtype=torch.int32)
    for slot, bits in enumerate((key_bits, value_bits)):
        given = torch.as_tensor(bits, dtype=torch.int32)
        if given.dim() == 1:
            given = given[:, None]
        try:
            table[slot] = given.expand(layers, heads) if given.dim() else given
        except RuntimeError as error:
            raise ValueError(
                f"bit widths {bits!r} do not fit {layers} layers x {heads} heads"
            ) from error
    _check_table(table)
    return table


def _check_table(table: torch.Tensor) -> None:
    keys, values = table[0], table[1]
    if int(keys.min()) < KEY_BITS.start or int(keys.max()) >= KEY_BITS.stop:
        raise ValueError(f"key bits must be in {KEY_BITS.start}..{KEY_BITS.stop - 1}")
    if int(values.min()) < VALUE_BITS.start or int(values.max()) >= VALUE_BITS.stop:
        raise ValueError(f"value bits must be in {VALUE_BITS.start}..{VALUE_BITS.stop - 1}")


def _round_bf16(x: torch.Tensor, direction: float) -> torch.Tensor:
    """x in bfloat16, rounded towards `direction` (-inf or inf) where it went the other way."""
    rounded = x.to(_PARAM_DTYPE)
    wrong = (rounded.float() < x) if direction > 0 else (rounded.float() > x)
    toward = torch.full_like(rounded, direction)
    return torch.where(wrong, torch.nextafter(rounded, toward), rounded).float()


def scale_params(x: torch.Tensor, bits: torch.Tensor, key_group: int, value_step: float):
    """Key `lo` and `step` `[layers, groups, heads, head_dim]` and value `step` `[layers, tokens,
    heads]` for float32 KV `x`, as float32 holding bfloat16 values."""
    keys, values = x[:, 0], x[:, 1]
    layers, tokens, heads, head_dim = keys.shape
    groups = -(-tokens // key_group)
    group_of = torch.arange(tokens, device=x.device) // key_group
    index = group_of.view(1, tokens, 1, 1).expand_as(keys)
    shape = (layers, groups, heads, head_dim)
    inf = float("inf")
    lo = torch.full(shape, inf, device=x.device).scatter_reduce(1, index, keys, "amin")
    hi = torch.full(shape, -inf, device=x.device).scatter_reduce(1, index, keys, "amax")
    lo = _round_bf16(lo, -inf)
    levels = (2.0 ** bits[0].float() - 1).view(layers, 1, heads, 1)
    key_step = _round_bf16((hi - lo) / levels, inf)
    key_step = torch.where(key_step > 0, key_step, torch.ones_like(key_step))
    qmax = (2.0 ** (bits[1].float() - 1) - 1).view(layers, 1, heads)
    rms = values.pow(2).mean(dim=3).sqrt()
    absmax = values.abs().amax(dim=3)
    step = _round_bf16(torch.maximum(value_step * rms, absmax / qmax), inf)
    step = torch.where(step > 0, step, torch.ones_like(step))
    return lo, key_step, step


def _per_token(params: torch.Tensor, key_group: int, tokens: int) -> torch.Tensor:
    return params.repeat_interleave(key_group, dim=1)[:, :tokens]


def quantize_reference(x, lo, key_step, value_step, bits, key_group) -> torch.Tensor:
    """uint8 codes `[2 * layers * heads, tokens * head_dim]`, one row per stream (K or V, layer,
    head), of float32 KV `x` `[layers, 2, tokens, heads, head_dim]`."""
    layers, _, tokens, heads, head_dim = x.shape
    levels = (2.0 ** bits[0].float() - 1).view(layers, 1, heads, 1)
    qmax = (2.0 ** (bits[1].float() - 1) - 1).view(layers, 1, heads, 1)
    shifted = x[:, 0] - _per_token(lo, key_group, tokens)
    key_codes = torch.round(shifted / _per_token(key_step, key_group, tokens))
    key_codes = torch.minimum(key_codes.clamp_(min=0), levels)
    value_codes = torch.round(x[:, 1] / value_step[..., None])
    value_codes = torch.maximum(torch.minimum(value_codes, qmax), -qmax) + qmax
    codes = torch.stack([key_codes, value_codes])  # [2, layers, tokens, heads, head_dim]
    return (
        codes.permute(0, 1, 3, 2, 4).reshape(2 * layers * heads, tokens * head_dim).to(torch.uint8)
    )


def dequantize_reference(codes, lo, key_step, value_step, bits, key_group, shape, dtype):
    """The KV `shape` in `dtype` that stream codes `[streams, tokens * head_dim]` stand for."""
    layers, _, tokens, heads, head_dim = shape
    grid = codes.reshape(2, layers, heads, tokens, head_dim).permute(0, 1, 3, 2, 4).float()
    qmax = (2.0 ** (bits[1].float() - 1) - 1).view(layers, 1, heads, 1)
    keys = grid[0] * _per_token(key_step, key_group, tokens) + _per_token(lo, key_group, tokens)
    values = (grid[1] - qmax) * value_step[..., None]
    return torch.stack([keys, values], dim=1).to(dtype)


def split_anchors(x: torch.Tensor, group: int):
    """Deltas of every token against its group's decoded anchor (the group's first token), and
    the anchors as int8 codes and float32 per-channel scales."""
    layers, _, tokens, heads, head_dim = x.shape
    anchors = x[:, :, ::group].reshape(layers * 2, -1, heads, head_dim)
    codes, scale = int8.quantize_reference(anchors, "channel")
    return x - _expand_anchors(codes, scale, group, x.shape), codes, scale


def _expand_anchors(codes, scale, group, shape) -> torch.Tensor:
    layers, _, tokens, heads, head_dim = shape
    decoded = int8.dequantize_reference(codes, scale, torch.float32)
    decoded = decoded.reshape(layers, 2, -1, heads, head_dim)
    return decoded.repeat_interleave(group, dim=2)[:, :, :tokens]


def _kernels():
    # Imported on first use on CUDA, so the CPU path never compiles a kernel.
    from kvcache.kernels import cachegen_triton

    return cachegen_triton


@register
class CacheGenCodec:
    name: ClassVar[str] = "cachegen"
    version: ClassVar[int] = 1

    def __init__(
        self,
        key_bits: int | Sequence = 4,
        value_bits: int | Sequence = 6,
        value_step: float = 0.8,
        key_group: int = 128,
        anchor_group: int = 0,
        entropy: str = "ans",
    ) -> None:
        if entropy not in entropy_stages.STAGES:
            raise ValueError(f"entropy must be one of {entropy_stages.STAGES}, got {entropy!r}")
        if key_group < 1 or anchor_group < 0:
            raise ValueError("key_group must be >= 1 and anchor_group >= 0")
        if not value_step > 0:
            raise ValueError(f"value_step must be positive, got {value_step}")
        for bits in (key_bits, value_bits):  # checked against the shape at encode time
            try:
                torch.as_tensor(bits, dtype=torch.int32)
            except (TypeError, ValueError, RuntimeError) as error:
                message = f"bit widths must be integers or lists of them, got {bits!r}"
                raise ValueError(message) from error
        self.key_bits = key_bits
        self.value_bits = value_bits
        self.value_step = value_step
        self.key_group = key_group
        self.anchor_group = anchor_group
        self.entropy = entropy

    def encode_body(self, kv: torch.Tensor) -> tuple[dict[str, Any], bytes]:
        layers, _, tokens, heads, head_dim = kv.shape
        table = bit_table(self.key_bits, self.value_bits, layers, heads)
        bits = table.to(kv.device)
        x = kv.float()
        anchor_parts: list[torch.Tensor] = []
        if self.anchor_group:
            x, anchor_codes, anchor_scale = split_anchors(x, self.anchor_group)
            anchor_parts = [anchor_codes, anchor_scale]
        lo, key_step, value_step = scale_params(x, bits, self.key_group, self.value_step)
        widths = self._widths(table, self.entropy)
        if kv.is_cuda:
            source = x if self.anchor_group else kv.contiguous()
            packed = _kernels().quantize_pack(
                source, lo, key_step, value_step, bits, widths, self.key_group
            )
        else:
            codes = quantize_reference(x, lo, key_step, value_step, bits, self.key_group)
            packed = pack_reference(codes, widths)
        code_bytes = entropy_stages.compress(self.entropy, _code_parts(packed, self.entropy))
        params_bytes = [tensor_bytes(part.to(_PARAM_DTYPE)) for part in (lo, key_step, value_step)]
        body = b"".join([*params_bytes, *(tensor_bytes(part) for part in anchor_parts), code_bytes])
        params = {
            "bits": table.flatten().tolist(),
            "key_group": self.key_group,
            "anchor_group": self.anchor_group,
            "entropy": self.entropy,
        }
        return params, body

    @staticmethod
    def _widths(table: torch.Tensor, entropy: str) -> list[int]:
        """Each stream's packed width: its bit width, or a whole byte for the entropy stage."""
        bits = table.flatten().tolist()
        return bits if entropy == "none" else [8] * len(bits)

    @classmethod
    def decode_body(
        cls, header: BlobHeader, body: memoryview, device: torch.device
    ) -> torch.Tensor:
        layers, _, tokens, heads, head_dim = header.shape
        table, key_group, anchor_group, entropy = cls._read_params(header.params, layers, heads)
        groups = -(-tokens // key_group)
        sizes = [layers * groups * heads * head_dim] * 2 + [layers * tokens * heads]
        parts, at = [], 0
        for count in sizes:
            parts.append(_take(body, at, count, _PARAM_DTYPE).float())
            at += count * 2
        lo = parts[0].reshape(layers, groups, heads, head_dim)
        key_step = parts[1].reshape(layers, groups, heads, head_dim)
        value_step = parts[2].reshape(layers, tokens, heads)
        anchors = None
        if anchor_group:
            count = layers * 2 * (-(-tokens // anchor_group)) * heads * head_dim
            anchor_codes = _take(body, at, count, torch.int8)
            at += count
            anchor_scale = _take(body, at, layers * 2 * heads * head_dim, torch.float32)
            at += anchor_scale.numel() * 4
            anchors = (
                anchor_codes.reshape(layers * 2, -1, heads, head_dim),
                anchor_scale.reshape(layers * 2, 1, heads, head_dim),
            )
        widths = cls._widths(table, entropy)
        packed_bytes = stream_offsets(tokens * head_dim, widths)[-1]
        sizes = [packed_bytes] if entropy == "none" else [packed_bytes // 2] * 2
        parts = entropy_stages.decompress(entropy, body[at:], sizes)
        packed = torch.from_numpy(np.concatenate(parts))
        tensors = [t.to(device) for t in (packed, lo, key_step, value_step, table)]
        packed, lo, key_step, value_step, bits = tensors
        dtype = DTYPES[header.dtype]
        out_dtype = torch.float32 if anchors else dtype
        if device.type == "cuda":
            kv = _kernels().unpack_dequantize(
                packed, lo, key_step, value_step, bits, widths, key_group, header.shape, out_dtype
            )
        else:
            codes = unpack_reference(packed, widths, tokens * head_dim)
            kv = dequantize_reference(
                codes, lo, key_step, value_step, bits, key_group, header.shape, out_dtype
            )
        if anchors:
            codes, scale = (part.to(device) for part in anchors)
            kv = (kv + _expand_anchors(codes, scale, anchor_group, header.shape)).to(dtype)
        return kv

    @staticmethod
    def _read_params(params: dict, layers: int, heads: int):
        try:
            bits = params["bits"]
            key_group, anchor_group = int(params["key_group"]), int(params["anchor_group"])
            entropy = params["entropy"]
            if len(bits) != 2 * layers * heads:
                raise ValueError(f"{len(bits)} bit widths for {layers} layers x {heads} heads")
            table = torch.tensor(bits, dtype=torch.int32).reshape(2, layers, heads)
            _check_table(table)
            if key_group < 1 or anchor_group < 0 or entropy not in entropy_stages.STAGES:
                raise ValueError(f"bad key_group, anchor_group or entropy in {params}")
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as error:
            raise CorruptBlob(f"cachegen parameters do not parse: {error}") from error
        return table, key_group, anchor_group, entropy


def _take(body: memoryview, at: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    if at + count * dtype.itemsize > body.nbytes:
        raise CorruptBlob(f"the body ends before {count} {dtype} values at byte {at}")
    return body_tensor(body, at, count, dtype)


def _code_parts(packed: torch.Tensor, entropy: str) -> list[np.ndarray]:
    """Packed codes as the entropy stage's parts: keys and values apart (their codes follow
    different distributions), or one part when they are bit packed."""
    flat = packed.cpu().numpy()
    return [flat] if entropy == "none" else np.split(flat, [flat.size // 2])
