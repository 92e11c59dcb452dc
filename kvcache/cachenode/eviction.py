"""Eviction policies: which stored key a full tier gives up next.

The memory tier tells a policy about inserts, reads and removals and asks it for a victim; the
policy never touches the values. A tier owns its policy instance (`make_policy(name)` builds one
per tier), and a policy must stay cheap on the hot path: no scan over all keys per call.

LRU is the baseline. The prefix-aware policy knows that a chunk at depth d is reachable only
while chunks 0..d-1 of its prompt are cached (the longest-prefix walk stops at the first miss),
so among equally cold chunks it gives up the deep ones first, and a shallow chunk shared by many
prompts outlives the deep chunks of any one of them.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
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


def chunk_depth(meta: Any) -> int:
    """A chunk's depth in its prefix chain from the meta its writer sent: anything but a
    non-negative int (a missing key, a float, a bool, a string, a negative number) counts as 0,
    since clients send arbitrary meta and a policy must never fail a PUT over it."""
    depth = meta.get("depth") if isinstance(meta, dict) else None
    return depth if type(depth) is int and depth > 0 else 0


@dataclass(slots=True)
class _Touch:
    clock: int  # the policy's touch counter when this key was last written or read
    depth: int


class PrefixAwarePolicy:
    """Cold and deep chunks first: the victim is the key with the lowest
    `rank = last touch - depth_weight * depth`, deeper first among equal ranks, older first
    among equal depths.

    Recency is counted in key touches (each insert or read ticks the tier's clock), and a chunk
    one level shallower counts as touched `depth_weight` touches later. Why this suits prefix
    chains: one pass over a prompt (the GET of its cached prefix, then the PUT of the rest)
    reaches a node's chunks in depth order; between two of them the clock moves by one touch
    (plus what other clients interleave) while the depth moves by about the number of nodes.
    So within a pass the rank falls with depth and the pass's chunks leave leaf first, as in
    SGLang's radix cache, where a matched path shares one access time: a prompt that is half
    evicted still hits its head, where LRU (head first) leaves an unreachable tail. Across
    passes recency rules, shifted by `depth_weight * depth` touches at most; the shift decides
    only when a tier cannot hold the prompts in flight, and then keeping heads is what pays.

    Not a clock per request: the client sends a prompt's 2-32 MiB chunks one or two per
    request, so a per-request tick is a per-key tick and (tick, -depth) order is plain LRU.
    `depth_weight` 2 was the largest weight of a sweep over 1-4 (docs/benchmarks.md) that never
    fell measurably below LRU: larger ones keep more heads at the tightest budgets and give up
    deep chunks of conversations about to continue elsewhere.

    Ranks are fixed at touch time, so a heap with lazy deletion names victims in O(log n): a
    re-touch or removal leaves its old entry behind, skipped when it surfaces, and the heap is
    rebuilt from live entries when stale ones outnumber them.
    """

    def __init__(self, depth_weight: int = 2) -> None:
        if depth_weight < 0:
            raise ValueError("depth_weight must be >= 0")
        self.depth_weight = depth_weight
        self._clock = 0
        self._touches: dict[bytes, _Touch] = {}
        # (rank, -depth, clock, key): clock is unique per touch, so it both breaks ties (older
        # first) and tells a live entry from a stale one.
        self._heap: list[tuple[int, int, int, bytes]] = []

    def __len__(self) -> int:
        return len(self._touches)

    def inserted(self, key: bytes, meta: dict[str, Any]) -> None:
        self._touch(key, chunk_depth(meta))

    def accessed(self, key: bytes) -> None:
        touch = self._touches.get(key)
        if touch is not None:
            self._touch(key, touch.depth)

    def removed(self, key: bytes) -> None:
        self._touches.pop(key, None)

    def victim(self) -> bytes | None:
        heap, touches = self._heap, self._touches
        while heap:
            _, _, clock, key = heap[0]
            touch = touches.get(key)
            if touch is not None and touch.clock == clock:
                return key
            heapq.heappop(heap)
        return None

    def _touch(self, key: bytes, depth: int) -> None:
        self._clock += 1
        clock = self._clock
        touch = self._touches.get(key)
        if touch is None:
            self._touches[key] = _Touch(clock, depth)
        else:
            touch.clock, touch.depth = clock, depth
        heapq.heappush(self._heap, (clock - self.depth_weight * depth, -depth, clock, key))
        if len(self._heap) > 2 * len(self._touches) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [
            (touch.clock - self.depth_weight * touch.depth, -touch.depth, touch.clock, key)
            for key, touch in self._touches.items()
        ]
        heapq.heapify(self._heap)


POLICIES = {"prefix": PrefixAwarePolicy, "lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy by its configured name ("prefix" or "lru"), one per tier."""
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {sorted(POLICIES)}") from None
