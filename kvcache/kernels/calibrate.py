"""Calibration of `cachegen`'s bit widths: spend a bit budget where it removes the most error.

A stream quantized to `b` bits has an error of about `weight * 4**-b` (each bit halves the step);
`allocate_bits` hands out bits one at a time to the stream where the next bit removes the most
weighted error, until the average reaches the budget (greedy water-filling, optimal for this
convex model). The weights come from a short calibration pass:
- `key_range_weights(samples)`: from sample KV alone, the squared per-channel range of each
  layer's and head's keys (the error of a uniform quantizer is proportional to it);
- or from the model, e.g. the KL divergence of the next-token distribution when one layer is
  quantized (`benchmarks/codecs.py` measures both and which pays).
The resulting table goes into `CacheGenCodec(key_bits=...)` and from there into every blob's
header, so decoders need nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def allocate_bits(
    weights: torch.Tensor, average_bits: float, min_bits: int = 2, max_bits: int = 8
) -> torch.Tensor:
    """Integer bit widths shaped like `weights` (non-negative), averaging `average_bits` (rounded
    to a whole number of bits over all streams)."""
    if weights.numel() == 0 or bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError("weights must be a non-empty tensor of finite, non-negative numbers")
    if not min_bits <= average_bits <= max_bits:
        raise ValueError(f"average_bits {average_bits} is outside {min_bits}..{max_bits}")
    flat = weights.double().flatten()
    bits = torch.full_like(flat, float(min_bits))
    for _ in range(round(average_bits * flat.numel()) - min_bits * flat.numel()):
        gain = torch.where(bits < max_bits, flat * 0.75 * 4.0**-bits, -1.0)
        bits[int(gain.argmax())] += 1
    return bits.to(torch.int32).reshape(weights.shape)


def key_range_weights(samples: Iterable[torch.Tensor]) -> torch.Tensor:
    """`[layers, heads]`: the mean squared per-channel key range over sample KV tensors shaped
    `[layers, 2, tokens, heads, head_dim]`."""
    total, count = None, 0
    for kv in samples:
        keys = kv[:, 0].float()
        spread = (keys.amax(dim=1) - keys.amin(dim=1)).pow(2).mean(dim=-1)
        total = spread if total is None else total + spread
        count += 1
    if total is None:
        raise ValueError("calibration needs at least one sample")
    return total / count
