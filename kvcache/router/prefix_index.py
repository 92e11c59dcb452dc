"""Which prefix blocks each engine holds, for the routing decision: `match` counts, per engine, how
many leading blocks of a request it can reuse.

Two structures, kept in step:
- `_holders`: block hash -> bitmask of the engines holding it (one bit per engine). `match` walks
  the request's hashes once, ANDing masks, and stops as soon as no engine is left: its cost is one
  dict lookup per matched block, whatever the number of engines or indexed blocks.
- per engine, an LRU of its hashes with a capacity in blocks (size it from the engine's block
  count), so the index's memory is bounded whatever the engines send. An entry's value is the
  expiry time of a speculative entry, or None once a `BlockStored` confirmed it.

Only blocks on the engine's GPU count (`medium` "GPU", or None from releases before tiers): a block
offloaded to CPU or storage is not a prefix-cache hit. A hash stored twice (two copies, or two
KV-cache groups) is one entry, gone at the first removal: the index may miss a block the engine
holds, but should not claim one it lacks. Not thread-safe: use it from the router's event loop.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvcache.router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch

DEFAULT_CAPACITY_BLOCKS = 32_768
_HEAP_SLACK = 1024  # stale expiry entries tolerated before a rebuild, whatever the capacity
_GPU_MEDIA = frozenset({"GPU", None})


@dataclass(eq=False)
class _Engine:
    bit: int
    capacity: int
    lru: OrderedDict[int, float | None] = field(default_factory=OrderedDict)


class PrefixIndex:
    def __init__(
        self,
        default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._default_capacity = default_capacity_blocks
        self._clock = clock
        self._holders: dict[int, int] = {}
        self._engines: dict[str, _Engine] = {}
        self._by_bit: dict[int, str] = {}
        self._all_bits = 0  # every registered engine's bit
        self._free_slots: list[int] = []  # a heap: the lowest free bit is reused first
        self._slots = itertools.count()
        # (expiry, tie-breaker, engine bit, hash): one per speculative entry, soonest first, of
        # plain numbers (the collector need not track them). A refresh only moves the entry's
        # expiry in its LRU; when the stale time comes up the entry is pushed again at its new
        # time, so the heap stays as large as the speculative entries, not as the refreshes.
        self._expiries: list[tuple[float, int, int, int]] = []
        self._tie = itertools.count()

    def add_engine(self, engine: str, capacity_blocks: int | None = None) -> None:
        """Registers `engine`, or resizes it (shrinking drops its least recent blocks). Engines
        seen first in `apply` or `add_speculative` get the default capacity."""
        capacity = self._default_capacity if capacity_blocks is None else capacity_blocks
        if capacity < 1:
            raise ValueError(f"an engine holds at least one block, not {capacity}")
        self._expire(self._clock())
        state = self._engine(engine)
        state.capacity = capacity
        self._evict_over_capacity(state)

    def apply(self, engine: str, batch: EventBatch) -> None:
        """Applies an engine's KV events, in order."""
        self._expire(self._clock())  # an expired entry must not push a live one out of the LRU
        state = self._engine(engine)
        for event in batch.events:
            if isinstance(event, BlockStored):
                if event.medium in _GPU_MEDIA:
                    for block_hash in event.block_hashes:
                        self._hold(state, block_hash, None)
            elif isinstance(event, BlockRemoved):
                if event.medium in _GPU_MEDIA:
                    for block_hash in event.block_hashes:
                        self._drop(state, block_hash)
            elif isinstance(event, AllBlocksCleared):
                self._clear(state)

    def add_speculative(self, engine: str, block_hashes: Sequence[int], ttl_s: float) -> None:
        """Marks blocks of a request just sent to `engine` as held there for `ttl_s`: the engine
        will cache them, but its `BlockStored` comes only after the prefill. A `BlockStored`
        within the TTL confirms an entry; otherwise it expires."""
        now = self._clock()
        self._expire(now)
        state = self._engine(engine)
        expiry = now + ttl_s
        for block_hash in block_hashes:
            if self._hold(state, block_hash, expiry):
                heapq.heappush(self._expiries, (expiry, next(self._tie), state.bit, block_hash))
        self._compact_expiries()

    def _compact_expiries(self) -> None:
        """Entries the LRUs evicted or events confirmed stay in the heap until their time comes:
        with a long TTL (text routing keeps prefixes for minutes) it would grow with the insert
        rate times the TTL. Past twice the entries the LRUs hold it is rebuilt from them, so it
        stays within the engines' capacity (amortized: a rebuild follows as many pushes)."""
        held = sum(len(state.lru) for state in self._engines.values())
        if len(self._expiries) <= 2 * held + _HEAP_SLACK:
            return
        self._expiries = [
            (expiry, next(self._tie), state.bit, block_hash)
            for state in self._engines.values()
            for block_hash, expiry in state.lru.items()
            if expiry is not None
        ]
        heapq.heapify(self._expiries)

    def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """For each engine holding the request's first block, how many leading blocks of the
        request it holds (stopping at its first miss). Engines absent from the result hold
        none."""
        self._expire(self._clock())
        holders = self._holders
        alive = self._all_bits
        matched: dict[str, int] = {}
        for depth, block_hash in enumerate(block_hashes):
            held = holders.get(block_hash, 0) & alive
            if held != alive:
                self._credit(alive & ~held, depth, matched)
                if not held:
                    return matched
                alive = held
        self._credit(alive, len(block_hashes), matched)
        return matched

    def clear(self, engine: str) -> None:
        """Forgets every block of `engine`, keeping the engine registered."""
        if engine in self._engines:
            self._clear(self._engines[engine])

    def remove(self, engine: str) -> None:
        """Forgets `engine` altogether (it left the fleet)."""
        state = self._engines.pop(engine, None)
        if state is not None:
            self._clear(state)
            del self._by_bit[state.bit]
            self._all_bits &= ~state.bit
            heapq.heappush(self._free_slots, state.bit.bit_length() - 1)

    def blocks(self, engine: str) -> int:
        """How many blocks `engine` is believed to hold, speculative ones included."""
        self._expire(self._clock())
        state = self._engines.get(engine)
        return 0 if state is None else len(state.lru)

    def _engine(self, engine: str) -> _Engine:
        state = self._engines.get(engine)
        if state is None:
            slot = heapq.heappop(self._free_slots) if self._free_slots else next(self._slots)
            state = _Engine(1 << slot, self._default_capacity)
            self._engines[engine] = state
            self._by_bit[state.bit] = engine
            self._all_bits |= state.bit
        return state

    def _hold(self, state: _Engine, block_hash: int, expiry: float | None) -> bool:
        """Holds a block, confirmed (`expiry` None) or speculative; True when a new speculative
        entry needs its expiry scheduled (a refreshed one is rescheduled when its old time
        comes)."""
        lru = state.lru
        if block_hash not in lru:
            lru[block_hash] = expiry
            self._holders[block_hash] = self._holders.get(block_hash, 0) | state.bit
            self._evict_over_capacity(state)
            return expiry is not None
        lru.move_to_end(block_hash)
        current = lru[block_hash]
        if expiry is None or current is None:  # confirming, or confirmed already
            lru[block_hash] = None
            return False
        if expiry > current:
            lru[block_hash] = expiry
        return False

    def _drop(self, state: _Engine, block_hash: int) -> None:
        if block_hash in state.lru:
            del state.lru[block_hash]
            self._release(state, block_hash)

    def _clear(self, state: _Engine) -> None:
        for block_hash in state.lru:
            self._release(state, block_hash)
        state.lru.clear()

    def _evict_over_capacity(self, state: _Engine) -> None:
        while len(state.lru) > state.capacity:
            self._release(state, state.lru.popitem(last=False)[0])

    def _release(self, state: _Engine, block_hash: int) -> None:
        """Clears the engine's bit for a hash already gone from its LRU."""
        remaining = self._holders[block_hash] & ~state.bit
        if remaining:
            self._holders[block_hash] = remaining
        else:
            del self._holders[block_hash]

    def _expire(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expiry, _, bit, block_hash = heapq.heappop(expiries)
            state = self._engines.get(self._by_bit.get(bit, ""))
            current = None if state is None else state.lru.get(block_hash)
            if current is None:  # confirmed, dropped, or its engine is gone
                continue
            if current > expiry:  # refreshed since: check again then
                heapq.heappush(expiries, (current, next(self._tie), bit, block_hash))
            elif current == expiry:
                del state.lru[block_hash]
                self._release(state, block_hash)

    def _credit(self, engines: int, depth: int, matched: dict[str, int]) -> None:
        """Records `depth` matched blocks for each engine whose bit is set in `engines`."""
        if depth == 0:
            return
        while engines:
            bit = engines & -engines
            matched[self._by_bit[bit]] = depth
            engines ^= bit
