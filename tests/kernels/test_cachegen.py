"""The `cachegen` codec through the registry: error within half a step of every stream's own
scale, bit tables per layer and head carried by the header, both entropy stages decoding to the
same KV, anchors, shapes from one element to none, and settings refused before anything is
encoded."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels import decode, encode
from kvcache.kernels.blob import unpack_blob
from kvcache.kernels.cachegen import CacheGenCodec, bit_table, scale_params

SHAPES = [(1, 2, 1, 1, 1), (2, 2, 17, 3, 64), (3, 2, 256, 2, 32), (1, 2, 0, 1, 8)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def sample_kv(shape, dtype, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=generator)
    if shape[2]:
        kv[:, 0, :, :, 0] = kv[:, 0, :, :, 0] * 5 + 30  # an offset, wide key channel
        kv[:, 1, :, 0, -1] *= 12  # value outliers
    return kv.to(dtype)


def error_bound(kv, codec: CacheGenCodec) -> torch.Tensor:
    """Half a quantization step per element (the reference's own steps), plus the rounding of the
    result to the tensor's dtype."""
    layers, _, tokens, heads, _ = kv.shape
    bits = bit_table(codec.key_bits, codec.value_bits, layers, heads)
    x = kv.float()
    _, key_step, value_step = scale_params(x, bits, codec.key_group, codec.value_step)
    key_half = key_step.repeat_interleave(codec.key_group, dim=1)[:, :tokens] / 2
    value_half = value_step[..., None].expand_as(x[:, 1]) / 2
    rounding = x.abs() * torch.finfo(kv.dtype).eps
    return torch.stack([key_half, value_half], dim=1) + rounding


@pytest.mark.parametrize("entropy", ["ans", "zstd", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_error_is_at_most_half_a_step_of_each_stream(shape, dtype, entropy):
    kv = sample_kv(shape, dtype)
    codec = CacheGenCodec(key_bits=3, value_bits=5, key_group=16, entropy=entropy)
    decoded = decode(encode(kv, codec))
    assert decoded.dtype == dtype and decoded.shape == kv.shape
    error = (decoded.float() - kv.float()).abs()
    assert bool((error <= error_bound(kv, codec) * 1.0001 + 1e-12).all())


def test_every_entropy_stage_decodes_to_the_same_kv_and_ans_is_the_smallest():
    kv = sample_kv((4, 2, 256, 2, 64), torch.float16)
    blobs = {stage: encode(kv, CacheGenCodec(entropy=stage)) for stage in ("none", "zstd", "ans")}
    assert torch.equal(decode(blobs["none"]), decode(blobs["zstd"]))
    assert torch.equal(decode(blobs["none"]), decode(blobs["ans"]))
    assert len(blobs["ans"]) < len(blobs["zstd"]) < len(blobs["none"])


def test_more_bits_mean_less_error_and_more_bytes():
    kv = sample_kv((2, 2, 128, 2, 64), torch.float32)
    sizes, errors = [], []
    for bits in (2, 4, 6, 8):
        blob = encode(kv, CacheGenCodec(key_bits=bits, value_bits=bits, entropy="none"))
        sizes.append(len(blob))
        errors.append(float((decode(blob) - kv).pow(2).mean()))
    assert sizes == sorted(sizes) and errors == sorted(errors, reverse=True)


def test_a_bit_table_per_layer_and_head_travels_in_the_header():
    kv = sample_kv((3, 2, 32, 2, 16), torch.float16)
    key_bits = [[2, 8], [5, 3], [4, 4]]
    codec = CacheGenCodec(key_bits=key_bits, value_bits=[7, 3, 2], entropy="none")
    blob = encode(kv, codec)
    header, _ = unpack_blob(blob)
    assert header.params["bits"] == [2, 8, 5, 3, 4, 4, 7, 7, 3, 3, 2, 2]
    error = (decode(blob).float() - kv.float()).abs()
    assert bool((error <= error_bound(kv, codec) * 1.0001 + 1e-12).all())
    # the 8-bit key head is far more precise than the 2-bit one of the same layer
    assert float(error[0, 0, :, 1].max()) < float(error[0, 0, :, 0].max()) / 10


@pytest.mark.parametrize("anchor_group", [1, 4, 7])
def test_anchors_decode_within_half_a_step_of_the_deltas(anchor_group):
    kv = sample_kv((2, 2, 30, 2, 16), torch.float32)
    codec = CacheGenCodec(anchor_group=anchor_group, entropy="none")
    decoded = decode(encode(kv, codec))
    base = decode(encode(kv, CacheGenCodec(entropy="none")))
    # deltas are quantized with their own (smaller) range, so the error stays in the same league
    assert float((decoded - kv).abs().max()) < 2 * float((base - kv).abs().max())
    assert not torch.equal(decoded, base)


def test_constant_and_zero_streams_come_back_exactly():
    kv = torch.zeros((2, 2, 8, 1, 4))
    kv[0, 0] = 3.0  # a constant key group: range 0
    decoded = decode(encode(kv, CacheGenCodec()))
    assert torch.equal(decoded, kv)


def test_default_shrinks_fp16_kv_well_beyond_int8():
    kv = sample_kv((30, 2, 256, 3, 64), torch.float16)
    assert kv.numel() * 2 / len(encode(kv, CacheGenCodec())) > 3.5


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"entropy": "lz4"}, "entropy"),
        ({"key_group": 0}, "key_group"),
        ({"anchor_group": -1}, "anchor_group"),
        ({"value_step": 0.0}, "value_step"),
        ({"key_bits": "four"}, "bit widths"),
        ({"value_bits": [[4, 5], [6]]}, "bit widths"),
    ],
)
def test_bad_settings_are_refused_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        CacheGenCodec(**settings)


@pytest.mark.parametrize(
    "settings", [{"key_bits": 9}, {"key_bits": 0}, {"value_bits": 1}, {"key_bits": [4, 4]}]
)
def test_bit_widths_that_do_not_fit_are_refused_at_encode(settings):
    with pytest.raises(ValueError, match="bit"):
        encode(sample_kv((3, 2, 4, 2, 8), torch.float16), CacheGenCodec(**settings))
