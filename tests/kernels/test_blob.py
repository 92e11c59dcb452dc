"""Blobs that were cut short, flipped or written by another version raise a typed error, never
decode into garbage: 1,000+ random corruptions of real blobs of every codec."""

from __future__ import annotations

import random
import struct

import msgpack
import pytest
import torch
import xxhash

from kvcache.kernels import decode, encode
from kvcache.kernels.blob import (
    BLOB_VERSION,
    MAGIC,
    BlobError,
    BlobHeader,
    CorruptBlob,
    TruncatedBlob,
    UnknownCodec,
    UnsupportedBlobVersion,
    pack_blob,
    unpack_blob,
)
from kvcache.kernels.cachegen import CacheGenCodec
from kvcache.kernels.int8 import Int8Codec
from kvcache.kernels.raw import RawCodec

CORRUPTIONS_PER_CODEC = 600


def blobs() -> dict[str, bytes]:
    kv = torch.randn((3, 2, 9, 2, 16), generator=torch.Generator().manual_seed(1))
    return {
        "none": encode(kv.half(), RawCodec()),
        "int8": encode(kv.bfloat16(), Int8Codec()),
        "cachegen": encode(kv.half(), CacheGenCodec()),
        "cachegen-zstd": encode(kv.bfloat16(), CacheGenCodec(entropy="zstd", key_bits=[2, 5, 8])),
        "cachegen-packed-anchors": encode(kv, CacheGenCodec(entropy="none", anchor_group=4)),
    }


def corrupt(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["truncate", "flip", "flips", "extend", "splice"])
    data = bytearray(blob)
    if kind == "truncate":
        return kind, bytes(data[: rng.randrange(len(data))])
    if kind == "flip":
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
        return kind, bytes(data)
    if kind == "flips":
        for _ in range(rng.randint(2, 16)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return kind, bytes(data) if bytes(data) != blob else bytes(data[:-1])
    if kind == "extend":
        return kind, bytes(data) + bytes(rng.randint(1, 64))
    start = rng.randrange(len(data))
    data[start : start + 8] = rng.randbytes(8)
    return kind, bytes(data) if bytes(data) != blob else bytes(data[:-1])


@pytest.mark.parametrize(
    "codec", ["none", "int8", "cachegen", "cachegen-zstd", "cachegen-packed-anchors"]
)
def test_random_corruptions_always_raise_a_typed_error(codec):
    blob = blobs()[codec]
    rng = random.Random(f"corrupt-{codec}")
    raised: dict[str, int] = {}
    for _ in range(CORRUPTIONS_PER_CODEC):
        kind, damaged = corrupt(blob, rng)
        with pytest.raises(BlobError) as error:
            decode(damaged)
        raised[type(error.value).__name__] = raised.get(type(error.value).__name__, 0) + 1
        raised[kind] = raised.get(kind, 0) + 1
    assert raised.get("TruncatedBlob") and raised.get("CorruptBlob")
    assert sum(raised.get(k, 0) for k in ("truncate", "flip", "flips", "extend", "splice")) == (
        CORRUPTIONS_PER_CODEC
    )


def test_a_blob_of_another_container_version_is_refused():
    blob = bytearray(blobs()["int8"])
    struct.pack_into("<H", blob, 4, BLOB_VERSION + 1)
    with pytest.raises(UnsupportedBlobVersion):
        decode(bytes(blob))


def rebuilt(header_fields: dict, body: bytes) -> bytes:
    """A blob with a consistent prefix and checksums around an arbitrary header."""
    packed = msgpack.packb(header_fields, use_bin_type=True)
    return b"".join([struct.pack("<4sHI", MAGIC, BLOB_VERSION, len(packed)), packed,
                     struct.pack("<Q", xxhash.xxh3_64_intdigest(packed)), body])  # fmt: skip


def valid_fields(payload: bytes, changes: dict | None = None) -> dict:
    fields = {"codec": "none", "cv": 1, "shape": [1, 2, 1, 1, 2], "dtype": "float32",
              "params": {}, "body": len(payload),
              "sum": xxhash.xxh3_64_intdigest(payload)}  # fmt: skip
    fields.update(changes or {})
    return fields


BODY = bytes(16)  # 1 x 2 x 1 x 1 x 2 float32
CACHEGEN = {"bits": [4, 6], "key_group": 64, "anchor_group": 0, "entropy": "none"}


def test_a_consistent_hand_made_blob_decodes():
    assert torch.equal(decode(rebuilt(valid_fields(BODY), BODY)), torch.zeros(1, 2, 1, 1, 2))


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"codec": "zstd-magic"}, UnknownCodec),
        ({"cv": 2}, UnsupportedBlobVersion),
        ({"dtype": "float64"}, CorruptBlob),
        ({"shape": [1, 2, 1, 1, 3]}, CorruptBlob),  # body too small for the shape
        ({"shape": [1 << 40, 2, 1 << 40, 1, 2]}, CorruptBlob),  # a huge allocation, refused
        ({"shape": [1, 3, 1, 1, 2]}, CorruptBlob),
        ({"shape": [1, 2, 1, 2]}, CorruptBlob),
        ({"shape": [1, 2, -1, 1, 2]}, CorruptBlob),
        ({"shape": "1,2,1,1,2"}, CorruptBlob),
        ({"params": []}, CorruptBlob),
        ({"body": 15}, TruncatedBlob),
        ({"sum": 0}, CorruptBlob),
        ({"codec": "int8", "params": {"k": "row", "v": "token"}}, CorruptBlob),
        ({"codec": "cachegen", "params": {}}, CorruptBlob),
        ({"codec": "cachegen", "params": dict(CACHEGEN, bits=[4])}, CorruptBlob),
        ({"codec": "cachegen", "params": dict(CACHEGEN, bits=[9, 6])}, CorruptBlob),
        ({"codec": "cachegen", "params": dict(CACHEGEN, bits=[4, 1])}, CorruptBlob),
        ({"codec": "cachegen", "params": dict(CACHEGEN, bits="46")}, CorruptBlob),
        ({"codec": "cachegen", "params": dict(CACHEGEN, key_group=0)}, CorruptBlob),
        ({"codec": "cachegen", "params": dict(CACHEGEN, anchor_group=-1)}, CorruptBlob),
        ({"codec": "cachegen", "params": dict(CACHEGEN, entropy="lz4")}, CorruptBlob),
        ({"codec": "cachegen", "params": CACHEGEN}, CorruptBlob),  # 16 bytes fit no layout
        ({"codec": "cachegen", "params": CACHEGEN, "shape": [1, 2, 1 << 40, 1, 2]}, CorruptBlob),
    ],
)
def test_consistent_blobs_with_impossible_headers_raise_typed_errors(changes, error):
    with pytest.raises(error):
        decode(rebuilt(valid_fields(BODY, changes), BODY))


def test_a_header_without_a_field_or_not_a_map_is_corrupt():
    fields = valid_fields(BODY)
    del fields["dtype"]
    with pytest.raises(CorruptBlob):
        decode(rebuilt(fields, BODY))
    with pytest.raises(CorruptBlob):
        decode(rebuilt([1, 2, 3], BODY))  # type: ignore[arg-type]


def test_pack_and_unpack_agree_on_every_field():
    header = BlobHeader("int8", 1, (2, 2, 3, 1, 4), "float16", {"k": "channel", "v": "token"})
    header_back, body = unpack_blob(pack_blob(header, b"payload"))
    assert bytes(body) == b"payload"
    assert (header_back.codec, header_back.shape, header_back.params) == (
        "int8", (2, 2, 3, 1, 4), {"k": "channel", "v": "token"},
    )  # fmt: skip
    assert header_back.body_bytes == 7
