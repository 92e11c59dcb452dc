"""Lossless entropy stages for quantization codes stored one per byte.

- `ans`: asymmetric numeral systems (the `constriction` library) with one static categorical
  model per part (keys and values), whose symbol counts travel with the data. It comes within a
  fraction of a percent of the codes' entropy: on SmolLM2's value codes, 2.09 bits per code
  where zstd needed 2.55.
- `zstd`: faster on both ends, less tight (zstd's Huffman tables span blocks that mix streams).
A stage's output is self-delimiting given the sizes of the parts, which the codec derives from
the blob's shape; anything that does not fit raises CorruptBlob.
"""

from __future__ import annotations

import struct

import constriction
import numpy as np
import zstandard

from kvcache.kernels.blob import CorruptBlob

STAGES = ("ans", "zstd", "none")
# Level 1 came within 2% of the key codes' entropy on real KV; higher levels spend time on
# matches that quantization noise does not have (level 3 was 15% larger).
ZSTD_LEVEL = 1
_U32 = struct.Struct("<I")


def compress(stage: str, parts: list[np.ndarray]) -> bytes:
    """uint8 code arrays (one per part) as one byte string."""
    if stage == "none":
        return b"".join(part.tobytes() for part in parts)
    if stage == "zstd":
        joined = b"".join(part.tobytes() for part in parts)
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(joined)
    return b"".join(_ans_encode(part) for part in parts)


def decompress(stage: str, data: memoryview, sizes: list[int]) -> list[np.ndarray]:
    """The uint8 parts of `sizes` codes each that `compress` turned into `data`."""
    if stage == "ans":
        parts, at = [], 0
        for size in sizes:
            part, at = _ans_decode(data, at, size)
            parts.append(part)
        if at != len(data):
            raise CorruptBlob(f"{len(data) - at} bytes follow the entropy-coded codes")
        return parts
    if stage == "zstd":
        raw = _zstd_decompress(bytes(data), sum(sizes))
    else:
        raw = bytes(data)
    if len(raw) != sum(sizes):
        raise CorruptBlob(f"{len(raw)} code bytes where the layout needs {sum(sizes)}")
    flat = np.frombuffer(raw, dtype=np.uint8)
    return np.split(flat, np.cumsum(sizes)[:-1])


def _zstd_decompress(frame: bytes, size: int) -> bytes:
    """One whole zstd frame declaring `size` bytes (checked first, so no frame makes us allocate
    more), with nothing after it."""
    try:
        if zstandard.frame_content_size(frame) != size:
            raise CorruptBlob(f"the zstd frame does not declare the {size} code bytes expected")
        reader = zstandard.ZstdDecompressor().decompressobj()
        raw = reader.decompress(frame)
    except zstandard.ZstdError as error:
        raise CorruptBlob(f"the codes' zstd frame does not decompress: {error}") from error
    if not reader.eof or reader.unused_data:
        raise CorruptBlob("the zstd frame is cut short or followed by other bytes")
    return raw


def _ans_encode(codes: np.ndarray) -> bytes:
    """u32 alphabet size, u32 counts, u32 word count, the ANS words (u32 each)."""
    if codes.size == 0:
        return _U32.pack(0) + _U32.pack(0)
    counts = np.bincount(codes, minlength=1).astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(codes.astype(np.int32), _model(counts))
    words = coder.get_compressed().astype("<u4")
    header = _U32.pack(counts.size) + counts.astype("<u4").tobytes()
    return header + _U32.pack(words.size) + words.tobytes()


def _ans_decode(data: memoryview, at: int, size: int) -> tuple[np.ndarray, int]:
    alphabet, at = _read_u32(data, at)
    if alphabet > 256 or (alphabet == 0) != (size == 0):
        raise CorruptBlob(f"an alphabet of {alphabet} symbols for {size} codes")
    counts = _read_words(data, at, alphabet)
    at += 4 * alphabet
    if alphabet and (int(counts.sum(dtype=np.uint64)) != size or counts[-1] == 0):
        raise CorruptBlob("the symbol counts do not match the number of codes")
    count, at = _read_u32(data, at)
    words = _read_words(data, at, count)
    at += 4 * count
    if size == 0:
        return np.empty(0, dtype=np.uint8), at
    try:
        decoded = constriction.stream.stack.AnsCoder(words).decode(_model(counts), size)
    except (ValueError, RuntimeError) as error:  # a truncated or tampered stream
        raise CorruptBlob(f"the ANS stream does not decode: {error}") from error
    return decoded.astype(np.uint8), at


def _model(counts: np.ndarray):
    # constriction needs two symbols at least; a part of one repeated code gets an unused second.
    probabilities = np.zeros(max(counts.size, 2), dtype=np.float64)
    probabilities[: counts.size] = counts
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def _read_u32(data: memoryview, at: int) -> tuple[int, int]:
    if at + 4 > len(data):
        raise CorruptBlob("the entropy-coded codes end early")
    return _U32.unpack_from(data, at)[0], at + 4


def _read_words(data: memoryview, at: int, count: int) -> np.ndarray:
    if at + 4 * count > len(data):
        raise CorruptBlob("the entropy-coded codes end early")
    return np.frombuffer(data, dtype="<u4", count=count, offset=at).astype(np.uint32)
