"""Payload checksums: computed by the writer, stored beside the value, verified by the reader.

XXH3-64 runs at memory speed (it never limits a transfer), and a value split into frames is hashed
frame by frame without joining them. It guards against torn or corrupted bytes, not against an
attacker: tenants are kept apart by their namespaces in the chunk keys, not by this sum.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import xxhash


def checksum(buffers: Sequence[Any]) -> int:
    """The XXH3-64 of the concatenation of `buffers` (any objects with the buffer protocol)."""
    if len(buffers) == 1:  # most values: one call, no hasher object
        return xxhash.xxh3_64_intdigest(buffers[0])
    state = xxhash.xxh3_64()
    for buffer in buffers:
        state.update(buffer)
    return state.intdigest()
