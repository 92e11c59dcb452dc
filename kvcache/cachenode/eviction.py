"""Eviction policies: which stored key a full tier gives up next.

The memory tier tells a policy about inserts, reads and removals and asks it for a victim; the
policy never touches the values. LRU is the baseline; a prefix-aware policy (deep and cold chunks
before the shallow ones many prompts share) plugs in through the same four calls.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol


class EvictionPolicy(Protocol):
    def inserted(self, key: bytes, meta: dict[str, Any]) -> None: ...

    def accessed(self, key: bytes) -> None: ...

    def removed(self, key: bytes) -> None: ...

    def victim(self) -> bytes | None:
        """The key to evict next, without removing it; None when nothing is tracked."""
        ...


class LRUPolicy:
    """Least recently used: a read or a write makes a key the youngest."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def inserted(self, key: bytes, meta: dict[str, Any]) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def accessed(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self) -> bytes | None:
        return next(iter(self._order), None)
