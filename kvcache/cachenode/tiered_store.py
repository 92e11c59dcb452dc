"""The node's store: the memory tier in front of an optional disk tier. No sockets here.

GET reads memory first, then disk; a disk hit is promoted into memory, which may push other values
down. The memory tier's victims spill to disk through its `on_evict`, so the memory budget is kept
by the memory tier alone. A promoted value keeps its disk record (the tiers are inclusive): when
memory evicts it again, the disk already holds it and nothing is written. A PUT of different bytes
under a key removes the key's old disk record first, so an older value never reappears from disk.
A value too large for the memory budget goes straight to disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvcache.cachenode.disk_tier import DiskTier
from kvcache.cachenode.memory_tier import MemoryTier, StoredValue
from kvcache.core.protocol import ValueInfo


class TieredStore:
    def __init__(self, memory: MemoryTier, disk: DiskTier | None = None) -> None:
        """The store owns both tiers: it points the memory tier's evictions at the disk tier."""
        self.memory = memory
        self.disk = disk
        self.promotions = 0  # disk hits copied into memory
        if disk is not None:
            memory.on_evict = disk.spill

    def __contains__(self, key: bytes) -> bool:
        return key in self.memory or (self.disk is not None and key in self.disk)

    def get(self, key: bytes) -> StoredValue | None:
        value = self.memory.get(key)
        if value is not None or self.disk is None:
            return value
        value = self.disk.get(key)
        if value is not None and self.memory.put(key, value.frames, value.info):
            self.promotions += 1
        return value

    def put(self, key: bytes, frames: Sequence[Any], info: ValueInfo) -> bool:
        """Store in memory (spilling its victims), else on disk; False when neither holds it."""
        if self.disk is None:
            return self.memory.put(key, frames, info)
        self.disk.delete_unless_same(key, info)
        if self.memory.put(key, frames, info):
            return True
        self.memory.delete(key)  # an older value under this key must not outlive this PUT
        return self.disk.put(key, frames, info)

    def delete(self, key: bytes) -> bool:
        in_memory = self.memory.delete(key)
        on_disk = self.disk is not None and self.disk.delete(key)
        return in_memory or on_disk

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
