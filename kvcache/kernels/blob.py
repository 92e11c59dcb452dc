"""The self-describing container every codec's output travels in.

    magic "KVCB" | u16 version | u32 header length | header (msgpack) | u64 XXH3 of the header
    | body

The header names the codec, the tensor's shape and dtype, the codec's parameters (bit widths,
scale layout, ...), and the body's length and XXH3-64, so a blob decodes with nothing but itself
and a blob that was cut short, flipped or written by another version raises a `BlobError`
subclass instead of decoding into garbage KV. Integers are little-endian.

This module never touches a tensor: codecs turn tensors into a body and parameters, and back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

MAGIC = b"KVCB"
BLOB_VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length
_HEADER_SUM = struct.Struct("<Q")
MAX_HEADER_BYTES = 1 << 20
SHAPE_RANK = 5  # [layers, 2, tokens, kv_heads, head_dim]


class BlobError(ValueError):
    """A blob that cannot be decoded; the subclass says why."""


class TruncatedBlob(BlobError):
    """Fewer (or more) bytes than the blob declares."""


class CorruptBlob(BlobError):
    """A checksum mismatch or a header that does not parse: the bytes changed."""


class UnsupportedBlobVersion(BlobError):
    """Written by a version of the container this code does not read."""


class UnknownCodec(BlobError):
    """Names a codec this process does not have."""


@dataclass(frozen=True)
class BlobHeader:
    codec: str
    codec_version: int
    shape: tuple[int, ...]
    dtype: str
    params: dict[str, Any] = field(default_factory=dict)
    body_bytes: int = 0
    body_checksum: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "codec": self.codec,
            "cv": self.codec_version,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "params": self.params,
            "body": self.body_bytes,
            "sum": self.body_checksum,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> BlobHeader:
        try:
            shape = tuple(raw["shape"])
            header = cls(
                codec=raw["codec"],
                codec_version=raw["cv"],
                shape=shape,
                dtype=raw["dtype"],
                params=raw["params"],
                body_bytes=raw["body"],
                body_checksum=raw["sum"],
            )
        except (KeyError, TypeError) as error:
            raise CorruptBlob(f"blob header lacks a field: {error}") from None
        valid = (
            isinstance(header.codec, str)
            and type(header.codec_version) is int
            and isinstance(header.dtype, str)
            and isinstance(header.params, dict)
            and len(shape) == SHAPE_RANK
            and all(type(n) is int and n >= 0 for n in shape)
            and type(header.body_bytes) is int
            and header.body_bytes >= 0
            and type(header.body_checksum) is int
        )
        if not valid:
            raise CorruptBlob("blob header has a field of the wrong type")
        return header


def pack_blob(header: BlobHeader, body: bytes | memoryview) -> bytes:
    """Header and body as one blob; the body's length and checksum are filled in here."""
    view = memoryview(body).cast("B")
    header = BlobHeader(
        header.codec,
        header.codec_version,
        header.shape,
        header.dtype,
        header.params,
        body_bytes=view.nbytes,
        body_checksum=xxhash.xxh3_64_intdigest(view),
    )
    packed = msgpack.packb(header.to_wire(), use_bin_type=True)
    return b"".join(
        [
            _PREFIX.pack(MAGIC, BLOB_VERSION, len(packed)),
            packed,
            _HEADER_SUM.pack(xxhash.xxh3_64_intdigest(packed)),
            view,
        ]
    )


def unpack_blob(blob: bytes | memoryview) -> tuple[BlobHeader, memoryview]:
    """The header and a view of the body, after every check; raises a `BlobError` subclass."""
    view = memoryview(blob).cast("B")
    if view.nbytes < _PREFIX.size:
        raise TruncatedBlob(f"{view.nbytes} bytes cannot hold a blob prefix")
    magic, version, header_bytes = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptBlob(f"not a kvcache KV blob (magic {bytes(magic)!r})")
    if version != BLOB_VERSION:
        raise UnsupportedBlobVersion(f"blob version {version}; this code reads {BLOB_VERSION}")
    if header_bytes > MAX_HEADER_BYTES:
        raise CorruptBlob(f"header of {header_bytes} bytes is over {MAX_HEADER_BYTES}")
    body_start = _PREFIX.size + header_bytes + _HEADER_SUM.size
    if view.nbytes < body_start:
        raise TruncatedBlob(f"{view.nbytes} bytes; the header alone needs {body_start}")
    packed = view[_PREFIX.size : _PREFIX.size + header_bytes]
    (header_sum,) = _HEADER_SUM.unpack_from(view, _PREFIX.size + header_bytes)
    if xxhash.xxh3_64_intdigest(packed) != header_sum:
        raise CorruptBlob("blob header checksum mismatch")
    try:
        raw = msgpack.unpackb(packed, raw=False, strict_map_key=True, max_ext_len=0)
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise CorruptBlob(f"blob header is not msgpack: {error}") from None
    if not isinstance(raw, dict):
        raise CorruptBlob("blob header is not a map")
    header = BlobHeader.from_wire(raw)
    body = view[body_start:]
    if body.nbytes != header.body_bytes:
        raise TruncatedBlob(f"body has {body.nbytes} bytes; the header says {header.body_bytes}")
    if xxhash.xxh3_64_intdigest(body) != header.body_checksum:
        raise CorruptBlob("blob body checksum mismatch")
    return header, body
