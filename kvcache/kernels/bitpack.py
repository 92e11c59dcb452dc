"""Bit packing of quantization codes, stream by stream: the torch reference.

A codec's codes come in streams (one per layer, K or V, and head for `cachegen`), each with its
own width `w` in 1..8 bits. A stream of `n` codes packs into `ceil(n * w / 8)` bytes, code `i`
taking bits `i*w .. i*w + w - 1` of the stream, least significant bit first, so any width packs
without waste and a stream starts on a byte boundary. The Triton kernels (`cachegen_triton.py`)
write and read exactly these bytes.
"""

from __future__ import annotations

import torch

MAX_WIDTH = 8


def stream_bytes(codes: int, width: int) -> int:
    return (codes * width + 7) // 8


def stream_offsets(codes: int, widths: list[int]) -> list[int]:
    """Byte offset of each stream in the packed buffer, and the total as the last entry."""
    offsets = [0]
    for width in widths:
        offsets.append(offsets[-1] + stream_bytes(codes, width))
    return offsets


def _check_widths(widths: list[int]) -> None:
    if any(not 1 <= width <= MAX_WIDTH for width in widths):
        raise ValueError(f"bit widths must be in 1..{MAX_WIDTH}, got {sorted(set(widths))}")


def pack_reference(codes: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """uint8 codes `[streams, n]` (each below 2**width of its stream) as one packed uint8 buffer."""
    _check_widths(widths)
    streams, count = codes.shape
    out = torch.zeros(stream_offsets(count, widths)[-1], dtype=torch.uint8, device=codes.device)
    offsets = stream_offsets(count, widths)
    for stream, width in enumerate(widths):
        shifts = torch.arange(width, device=codes.device, dtype=torch.int32)
        bits = ((codes[stream].to(torch.int32)[:, None] >> shifts) & 1).flatten()
        padded = torch.zeros(stream_bytes(count, width) * 8, dtype=torch.int32, device=codes.device)
        padded[: bits.numel()] = bits
        byte_shifts = torch.arange(8, device=codes.device, dtype=torch.int32)
        packed = (padded.reshape(-1, 8) << byte_shifts).sum(dim=1)
        out[offsets[stream] : offsets[stream + 1]] = packed.to(torch.uint8)
    return out


def unpack_reference(packed: torch.Tensor, widths: list[int], count: int) -> torch.Tensor:
    """The codes `[streams, count]` (uint8) that `pack_reference` packed into `packed`."""
    _check_widths(widths)
    offsets = stream_offsets(count, widths)
    if packed.numel() != offsets[-1]:
        raise ValueError(f"{packed.numel()} packed bytes; the widths need {offsets[-1]}")
    out = torch.empty((len(widths), count), dtype=torch.uint8, device=packed.device)
    byte_shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    for stream, width in enumerate(widths):
        data = packed[offsets[stream] : offsets[stream + 1]].to(torch.int32)
        bits = ((data[:, None] >> byte_shifts) & 1).flatten()[: count * width]
        shifts = torch.arange(width, device=packed.device, dtype=torch.int32)
        out[stream] = (bits.reshape(count, width) << shifts).sum(dim=1).to(torch.uint8)
    return out
