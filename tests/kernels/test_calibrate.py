"""Bit allocation: the budget is spent exactly, larger weights get more bits, bounds hold."""

from __future__ import annotations

import pytest
import torch

from kvcache.kernels.calibrate import allocate_bits, key_range_weights


def test_the_budget_is_spent_exactly_and_within_bounds():
    weights = torch.rand(30, 3, generator=torch.Generator().manual_seed(0)) * 100
    bits = allocate_bits(weights, 4.0, min_bits=2, max_bits=8)
    assert bits.shape == weights.shape and bits.dtype == torch.int32
    assert int(bits.sum()) == 4 * 90
    assert int(bits.min()) >= 2 and int(bits.max()) <= 8


def test_a_stream_with_16x_the_weight_gets_2_more_bits():
    # each bit quarters the error, so 16x the weight is worth exactly two bits
    bits = allocate_bits(torch.tensor([[1.0, 16.0]]), 4.0)
    assert bits.tolist() == [[3, 5]]


def test_larger_weights_never_get_fewer_bits():
    weights = torch.tensor([0.1, 1.0, 3.0, 50.0, 1e4, 0.0])
    bits = allocate_bits(weights, 4.5)
    order = weights.argsort()
    assert bits[order].tolist() == sorted(bits.tolist())
    assert int(bits[-1]) == 2  # a zero weight keeps the minimum


@pytest.mark.parametrize(
    "weights, average",
    [(torch.tensor([]), 4.0), (torch.tensor([-1.0]), 4.0), (torch.tensor([1.0]), 9.0),
     (torch.tensor([float("nan")]), 4.0)],
)  # fmt: skip
def test_bad_calibration_input_is_refused(weights, average):
    with pytest.raises(ValueError):
        allocate_bits(weights, average)


def test_key_range_weights_follow_the_range_of_each_head():
    kv = torch.zeros(2, 2, 16, 2, 4)
    kv[0, 0, :, 1] = torch.linspace(-3, 3, 16)[:, None]  # layer 0, head 1: range 6
    kv[1, 0, :, 0] = torch.linspace(0, 1, 16)[:, None]  # layer 1, head 0: range 1
    weights = key_range_weights([kv, kv])
    assert torch.allclose(weights, torch.tensor([[0.0, 36.0], [1.0, 0.0]]))
    with pytest.raises(ValueError):
        key_range_weights([])
