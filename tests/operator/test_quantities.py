"""Byte quantities are rendered as the API server stores them, so an applied child compares
equal to its rendering: the forms apimachinery's CanonicalizeBytes writes back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcache.core.config import parse_bytes
from kvcache.operator.quantities import canonical


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("0", "0"),
        ("0Gi", "0"),
        ("50Gi", "50Gi"),
        ("1024Mi", "1Gi"),
        ("1.5Gi", "1536Mi"),
        ("5632Mi", "5632Mi"),
        ("1024Ei", "1024Ei"),  # no suffix above Ei
        ("1000M", "1G"),
        ("1500M", "1500M"),
        ("100000k", "100M"),
        ("2048", "2048"),  # a plain number is decimal
        ("12345678", "12345678"),
        ("0.5Ki", "512"),  # under 1Ki: decimal
        ("1.5Ki", "1536"),
        ("0.5", "500m"),
    ],
)
def test_quantities_are_spelled_as_the_api_server_stores_them(written, stored):
    assert canonical(written) == stored


@given(
    st.integers(min_value=0, max_value=10**6),
    st.sampled_from(["", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"]),
)
def test_the_canonical_spelling_is_the_same_size_and_stable(number, suffix):
    written = f"{number}{suffix}"
    assert parse_bytes(canonical(written)) == parse_bytes(written)
    assert canonical(canonical(written)) == canonical(written)


def test_what_is_not_a_byte_quantity_is_refused():
    with pytest.raises(ValueError):
        canonical("-1Gi")
