"""Distinct 32-byte chunk keys for tests, reproducible from a label."""

from __future__ import annotations

import hashlib


def make_keys(count: int, label: str = "k") -> list[bytes]:
    return [hashlib.blake2b(f"{label}{i}".encode(), digest_size=32).digest() for i in range(count)]
