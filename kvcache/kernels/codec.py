"""The codec registry: KV tensors `[layers, 2, tokens, kv_heads, head_dim]` to blobs and back.

`encode(kv, codec)` runs a codec and wraps its body and parameters in a blob (see `blob.py`);
`decode(blob)` reads the codec's name, version, shape and dtype back from the blob, so a reader
needs nothing but the bytes. Codecs register by name; each keeps its torch reference next to its
kernels. A tensor of the wrong rank or dtype, or with NaN or inf, is refused with ValueError before
anything is encoded; a blob that fails any check raises a `BlobError` subclass.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any, ClassVar, Protocol

import torch

from kvcache.kernels.blob import (
    SHAPE_RANK,
    BlobHeader,
    CorruptBlob,
    UnknownCodec,
    UnsupportedBlobVersion,
    pack_blob,
    unpack_blob,
)

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class Codec(Protocol):
    """One way of turning KV into bytes. Instances carry the encoder's settings; decoding reads
    everything it needs from the blob's header."""

    name: ClassVar[str]
    version: ClassVar[int]

    def encode_body(self, kv: torch.Tensor) -> tuple[dict[str, Any], bytes]:
        """The parameters a decoder needs, and the body bytes."""
        ...

    @classmethod
    def decode_body(
        cls, header: BlobHeader, body: memoryview, device: torch.device
    ) -> torch.Tensor:
        """The KV tensor on `device`, in the header's dtype; CorruptBlob if the body and the
        parameters do not fit the shape."""
        ...


_REGISTRY: dict[str, type[Codec]] = {}


def register(codec: type[Codec]) -> type[Codec]:
    if codec.name in _REGISTRY:
        raise ValueError(f"codec {codec.name!r} is registered twice")
    _REGISTRY[codec.name] = codec
    return codec


def codec_names() -> list[str]:
    return sorted(_REGISTRY)


def codec_by_name(name: str) -> Codec:
    """The named codec with its default settings."""
    if name not in _REGISTRY:
        raise ValueError(f"codec {name!r} is not one of {codec_names()}")
    return _REGISTRY[name]()


def check_kv(kv: torch.Tensor) -> None:
    if not isinstance(kv, torch.Tensor):
        raise ValueError(f"KV must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != SHAPE_RANK or kv.shape[1] != 2:
        raise ValueError(
            f"KV must be shaped [layers, 2, tokens, kv_heads, head_dim], got {list(kv.shape)}"
        )
    if kv.dtype not in DTYPE_NAMES:
        raise ValueError(f"KV dtype must be one of {sorted(DTYPES)}, got {kv.dtype}")
    if not bool(torch.isfinite(kv).all()):
        raise ValueError("KV contains NaN or inf")


def encode(kv: torch.Tensor, codec: Codec) -> bytes:
    """`kv` as a self-describing blob."""
    check_kv(kv)
    params, body = codec.encode_body(kv)
    header = BlobHeader(
        codec=codec.name,
        codec_version=codec.version,
        shape=tuple(kv.shape),
        dtype=DTYPE_NAMES[kv.dtype],
        params=params,
    )
    return pack_blob(header, body)


def decode(blob: bytes | memoryview, device: torch.device | str = "cpu") -> torch.Tensor:
    """The KV tensor a blob holds, on `device`; raises a `BlobError` subclass on a bad blob."""
    header, body = unpack_blob(blob)
    codec = _REGISTRY.get(header.codec)
    if codec is None:
        raise UnknownCodec(f"codec {header.codec!r} is not one of {codec_names()}")
    if header.codec_version != codec.version:
        raise UnsupportedBlobVersion(
            f"{header.codec} version {header.codec_version}; this code reads {codec.version}"
        )
    if header.dtype not in DTYPES:
        raise CorruptBlob(f"blob dtype {header.dtype!r} is not one of {sorted(DTYPES)}")
    if header.shape[1] != 2:
        raise CorruptBlob(f"blob shape {list(header.shape)} is not [layers, 2, ...]")
    return codec.decode_body(header, body, torch.device(device))


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def body_tensor(body: memoryview, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` elements of `dtype` from `body` at byte `start`, copied out of the blob."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(body[start : start + count * dtype.itemsize]), dtype=dtype)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's elements as bytes (native little-endian), whatever its dtype or device."""
    flat = tensor.detach().cpu().contiguous()
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())
