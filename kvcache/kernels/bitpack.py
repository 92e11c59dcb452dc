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


def _same_width_runs(widths: list[int]):
    """(first stream, last stream + 1, width) for each run of equal widths."""
    start = 0
    for stream in range(1, len(widths) + 1):
        if stream == len(widths) or widths[stream] != widths[start]:
            yield start, stream, widths[start]
            start = stream


def pack_reference(codes: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """uint8 codes `[streams, n]` (each below 2**width of its stream) as one packed uint8 buffer."""
    _check_widths(widths)
    count = codes.shape[1]
    offsets = stream_offsets(count, widths)
    out = torch.empty(offsets[-1], dtype=torch.uint8, device=codes.device)
    for first, last, width in _same_width_runs(widths):
        size = stream_bytes(count, width)
        run = out[offsets[first] : offsets[last]].view(last - first, size)
        if width == MAX_WIDTH:
            run.copy_(codes[first:last])
            continue
        shifts = torch.arange(width, device=codes.device, dtype=torch.uint8)
        bits = ((codes[first:last, :, None] >> shifts) & 1).reshape(last - first, -1)
        padded = torch.zeros((last - first, size * 8), dtype=torch.uint8, device=codes.device)
        padded[:, : bits.shape[1]] = bits
        byte_shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
        run.copy_((padded.view(last - first, size, 8) << byte_shifts).sum(dim=2, dtype=torch.uint8))
    return out


def unpack_reference(packed: torch.Tensor, widths: list[int], count: int) -> torch.Tensor:
    """The codes `[streams, count]` (uint8) that `pack_reference` packed into `packed`."""
    _check_widths(widths)
    offsets = stream_offsets(count, widths)
    if packed.numel() != offsets[-1]:
        raise ValueError(f"{packed.numel()} packed bytes; the widths need {offsets[-1]}")
    out = torch.empty((len(widths), count), dtype=torch.uint8, device=packed.device)
    byte_shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    for first, last, width in _same_width_runs(widths):
        run = packed[offsets[first] : offsets[last]].view(last - first, -1)
        if width == MAX_WIDTH:
            out[first:last] = run
            continue
        bits = ((run[:, :, None] >> byte_shifts) & 1).reshape(last - first, -1)
        bits = bits[:, : count * width].reshape(last - first, count, width)
        shifts = torch.arange(width, device=packed.device, dtype=torch.uint8)
        out[first:last] = (bits << shifts).sum(dim=2, dtype=torch.uint8)
    return out
