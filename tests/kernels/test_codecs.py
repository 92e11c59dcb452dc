"""Codecs through the registry: exact round trips for `none`, bounded error for `int8`, refused
inputs, and blobs that decode with nothing but their own bytes."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels import codec_names, decode, encode
from kvcache.kernels.int8 import QMAX, Int8Codec, quantize_reference
from kvcache.kernels.raw import RawCodec

# a single element, a single token, odd token counts, a wide head, and no tokens at all
SHAPES = [(1, 2, 1, 1, 1), (2, 2, 1, 3, 64), (3, 2, 17, 3, 64), (2, 2, 256, 2, 128),
          (1, 2, 0, 1, 8)]  # fmt: skip
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def sample_kv(shape, dtype, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=generator) * 3
    if shape[2]:
        kv[:, 0, :, :, 0] *= 20  # an outlier key channel, as real keys have
    return kv.to(dtype)


def test_the_registry_lists_the_codecs():
    assert {"none", "int8"} <= set(codec_names())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_none_round_trips_bit_for_bit(shape, dtype):
    kv = sample_kv(shape, dtype)
    decoded = decode(encode(kv, RawCodec()))
    assert decoded.dtype == dtype and decoded.shape == kv.shape
    assert torch.equal(decoded.view(torch.uint8), kv.view(torch.uint8))


@pytest.mark.parametrize("layouts", [("channel", "token"), ("token", "channel"),
                                     ("channel", "channel"), ("token", "token")])  # fmt: skip
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_is_at_most_half_a_step_of_its_scale(shape, dtype, layouts):
    kv = sample_kv(shape, dtype)
    codec = Int8Codec(*layouts)
    decoded = decode(encode(kv, codec))
    assert decoded.dtype == dtype and decoded.shape == kv.shape
    for index, layout in enumerate(layouts):
        original = kv[:, index].float()
        _, scale = quantize_reference(original, layout)
        error = (decoded[:, index].float() - original).abs()
        # half a quantization step, plus the rounding of the result to the tensor's dtype
        bound = scale / 2 + original.abs() * torch.finfo(dtype).eps
        assert bool((error <= bound * 1.0001 + 1e-12).all())


def test_int8_is_about_half_the_size_of_fp16():
    kv = sample_kv((30, 2, 256, 3, 64), torch.float16)
    blob = encode(kv, Int8Codec())
    assert kv.numel() * 2 / len(blob) > 1.95


def test_int8_keeps_zeros_and_extremes_exact():
    kv = torch.zeros((2, 2, 4, 1, 8), dtype=torch.float32)
    kv[0, 0, 1, 0, 3] = -5.0
    kv[1, 1, 2, 0, 7] = 7.25
    decoded = decode(encode(kv, Int8Codec()))
    assert torch.equal(decoded, kv)  # absmax maps to ±127 exactly; zero groups stay zero


def test_codes_stay_in_the_symmetric_range():
    codes, _ = quantize_reference(torch.randn(2, 9, 3, 8) * 1e4, "channel")
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= QMAX


@pytest.mark.parametrize(
    "kv, message",
    [
        (torch.zeros(2, 3, 4, 1, 8), "shaped"),
        (torch.zeros(2, 2, 4, 8), "shaped"),
        (torch.zeros(2, 2, 4, 1, 8, dtype=torch.int32), "dtype"),
        (torch.zeros(2, 2, 4, 1, 8, dtype=torch.float64), "dtype"),
        (torch.full((1, 2, 1, 1, 2), float("nan")), "NaN"),
        (torch.full((1, 2, 1, 1, 2), float("inf")), "NaN or inf"),
        ([[1.0]], "torch.Tensor"),
    ],
    ids=["not-k-and-v", "rank-4", "int32", "float64", "nan", "inf", "list"],
)
def test_bad_input_is_refused_before_encoding(kv, message):
    for codec in (RawCodec(), Int8Codec()):
        with pytest.raises(ValueError, match=message):
            encode(kv, codec)


def test_unknown_scale_layout_is_refused():
    with pytest.raises(ValueError, match="scale layout"):
        Int8Codec(key_scales="row")


def test_non_contiguous_views_encode_as_their_values():
    base = sample_kv((2, 2, 8, 3, 16), torch.float32)
    view = base.transpose(3, 4).contiguous().transpose(3, 4)  # same values, other strides
    assert not view.is_contiguous()
    assert torch.equal(decode(encode(view, RawCodec())), base)
