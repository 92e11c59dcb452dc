"""The memory tier: values held as the frames they arrived in, under a hard byte budget.

Large values stay in the buffers libzmq received them into and are sent back from the same
buffers, so a PUT followed by GETs never copies the payload in Python. Every value is charged its
size plus a fixed bookkeeping overhead; the charged total never exceeds the budget: an insert first
evicts what the policy names, and a value larger than the whole budget is refused. Each evicted
value is handed to `on_evict` (the disk tier's spill, when there is one) after its charge is
released, so the budget holds even while the victim is being written elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvcache.cachenode.eviction import EvictionPolicy, LRUPolicy
from kvcache.core.protocol import ValueInfo

# What an entry costs beyond its payload, measured as the node's RSS with the tier full of
# one-byte values (tests/cachenode/test_fuzz.py): ~1 KiB with no meta, ~8 KiB with the costliest
# meta `check_meta` lets through (16 names no other value uses, each with a short string). A
# fixed charge keeps a tier of tiny values within its budget; on MiB-sized chunks it is noise.
ENTRY_OVERHEAD_BYTES = 8192
FRAME_OVERHEAD_BYTES = 128


@dataclass(frozen=True)
class StoredValue:
    frames: tuple[Any, ...]  # zmq.Frame or bytes: anything sendable without a copy
    info: ValueInfo

    @property
    def charged_bytes(self) -> int:
        return self.info.size + ENTRY_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES * len(self.frames)


class MemoryTier:
    def __init__(
        self,
        budget_bytes: int,
        policy: EvictionPolicy | None = None,
        on_evict: Callable[[bytes, StoredValue], None] | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.evictions = 0
        self.on_evict = on_evict
        self._values: dict[bytes, StoredValue] = {}
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: bytes) -> bool:
        return key in self._values

    def get(self, key: bytes) -> StoredValue | None:
        value = self._values.get(key)
        if value is not None:
            self._policy.accessed(key)
        return value

    def put(self, key: bytes, frames: Sequence[Any], info: ValueInfo) -> bool:
        """Store a value, evicting as needed; False when it can never fit the budget."""
        value = StoredValue(frames=tuple(frames), info=info)
        charge = value.charged_bytes
        if charge > self.budget_bytes:
            return False
        self.delete(key)
        while self.used_bytes + charge > self.budget_bytes:
            victim = self._policy.victim()
            if victim is None:  # unreachable while the accounting is right; never loop forever
                return False
            evicted = self._values.get(victim)
            self.delete(victim)
            self.evictions += 1
            if evicted is not None and self.on_evict is not None:
                self.on_evict(victim, evicted)
        self._values[key] = value
        self.used_bytes += charge
        self._policy.inserted(key, info.meta)
        return True

    def delete(self, key: bytes) -> bool:
        value = self._values.pop(key, None)
        if value is None:
            return False
        self.used_bytes -= value.charged_bytes
        self._policy.removed(key)
        return True
