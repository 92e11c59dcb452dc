"""The prefix index with plain values and a fake clock: leading-block matches per engine, the
events' effects, GPU blocks only, the LRU bound, speculative entries that expire unless confirmed,
engines leaving; and, for random operation sequences, the same answers as a naive model."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.router.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch
from kvcache.router.prefix_index import PrefixIndex


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def batch(*events) -> EventBatch:
    return EventBatch(0, 0.0, events)


def stored(*hashes: int, medium: str | None = "GPU") -> BlockStored:
    return BlockStored(hashes, None, tuple(range(len(hashes))), 1, medium=medium)


def removed(*hashes: int, medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved(hashes, medium)


def test_each_engine_matches_its_leading_blocks_up_to_its_first_miss():
    index = PrefixIndex()
    index.apply("a", batch(stored(1, 2, 3, 4)))
    index.apply("b", batch(stored(1, 2), stored(4)))  # a hole at 3
    index.apply("c", batch(stored(2, 3)))  # no first block
    assert index.match([1, 2, 3, 4, 5]) == {"a": 4, "b": 2}
    assert index.match([1, 2, 3, 4]) == {"a": 4, "b": 2}
    assert index.match([9, 1]) == {} and index.match([]) == {}


def test_removals_and_clears_apply_to_their_engine_only():
    index = PrefixIndex()
    index.apply("a", batch(stored(1, 2, 3)))
    index.apply("b", batch(stored(1, 2, 3)))
    index.apply("a", batch(removed(2)))
    assert index.match([1, 2, 3]) == {"a": 1, "b": 3}
    index.apply("b", batch(AllBlocksCleared(), stored(7)))  # events apply in order
    assert index.match([1, 2, 3]) == {"a": 1} and index.match([7]) == {"b": 1}
    index.clear("a")
    assert index.match([1]) == {} and index.blocks("a") == 0 and index.blocks("b") == 1


def test_only_blocks_on_the_gpu_count():
    index = PrefixIndex()
    index.apply("a", batch(stored(1, medium=None), stored(2, medium="CPU"), stored(2)))
    index.apply("a", batch(removed(2, medium="CPU")))  # the offloaded copy went, not the GPU's
    index.apply("b", batch(stored(1, 2, medium="STORAGE")))
    assert index.match([1, 2]) == {"a": 2}


def test_each_engine_holds_at_most_its_capacity_least_recent_first():
    index = PrefixIndex(default_capacity_blocks=4)
    index.apply("a", batch(stored(1, 2, 3, 4)))
    index.apply("a", batch(stored(1)))  # a reuse event: 1 is now the most recent
    index.apply("a", batch(stored(5, 6)))
    assert index.blocks("a") == 4
    assert index.match([1]) == {"a": 1} and index.match([2]) == {} and index.match([3]) == {}
    index.add_engine("a", capacity_blocks=2)  # the engine reported fewer blocks
    assert index.blocks("a") == 2 and index.match([5, 6]) == {"a": 2}
    index.add_engine("b", capacity_blocks=1)
    index.apply("b", batch(stored(5, 6)))
    assert index.match([6]) == {"a": 1, "b": 1} and index.match([5]) == {"a": 1}


def test_speculative_entries_expire_unless_confirmed():
    clock = Clock()
    index = PrefixIndex(clock=clock)
    index.add_speculative("a", [1, 2, 3], ttl_s=2.0)
    assert index.match([1, 2, 3]) == {"a": 3}
    clock.now += 1.0
    index.apply("a", batch(stored(1, 2)))  # the engine's events arrive for two of them
    clock.now += 1.5
    assert index.match([1, 2, 3]) == {"a": 2} and index.blocks("a") == 2
    clock.now += 100
    assert index.match([1, 2]) == {"a": 2}  # confirmed entries do not expire


def test_speculation_never_downgrades_and_a_refresh_extends_it():
    clock = Clock()
    index = PrefixIndex(clock=clock)
    index.apply("a", batch(stored(1)))
    index.add_speculative("a", [1, 2], ttl_s=1.0)
    clock.now += 0.8
    index.add_speculative("a", [2], ttl_s=1.0)  # routed again: expires at 1.8 now
    clock.now += 0.5
    assert index.match([1, 2]) == {"a": 2}
    clock.now += 0.6
    assert index.match([1, 2]) == {"a": 1}
    index.add_speculative("a", [5], ttl_s=10.0)
    index.apply("a", batch(removed(5)))  # the engine evicted it already
    assert index.match([5]) == {}


def test_refreshing_entries_keeps_one_scheduled_expiry_each():
    """A router refreshes a hot prefix on every request: the expiry heap must stay as large as the
    entries (each holding plain numbers), not grow with the refreshes until they expire."""
    clock = Clock()
    index = PrefixIndex(clock=clock)
    hashes = list(range(64))
    for _ in range(1000):
        index.add_speculative("a", hashes, ttl_s=300)
        clock.now += 0.01
    assert len(index._expiries) == len(hashes)
    clock.now += 301
    assert index.match(hashes) == {} and not index._expiries


def test_the_expiry_heap_stays_within_the_engines_capacity_under_a_long_ttl():
    """Text routing keeps prefixes for minutes: entries the LRU evicts must not pile up in the
    expiry heap at the insert rate times the TTL (512k entries after 20 s were measured)."""
    clock = Clock()
    index = PrefixIndex(default_capacity_blocks=100, clock=clock)
    for request in range(5_000):
        index.add_speculative("a", range(request * 10, request * 10 + 10), ttl_s=300)
        clock.now += 0.001
    assert len(index._expiries) <= 2 * 100 + 1024
    assert index.blocks("a") == 100
    # what the LRU still holds still expires on time
    assert index.match(range(49_990, 50_000)) == {"a": 10}
    clock.now += 301
    assert index.match(range(49_990, 50_000)) == {}


def test_an_expired_entry_never_pushes_a_live_one_out():
    clock = Clock()
    index = PrefixIndex(default_capacity_blocks=2, clock=clock)
    index.apply("a", batch(stored(1)))
    index.add_speculative("a", [2], ttl_s=1.0)
    clock.now += 2.0
    index.apply("a", batch(stored(3)))  # full only if the expired 2 still counted
    assert index.match([1]) == {"a": 1} and index.blocks("a") == 2


def test_an_engine_that_leaves_takes_its_blocks_and_its_slot_is_reused_clean():
    index = PrefixIndex()
    index.apply("a", batch(stored(1, 2)))
    index.apply("b", batch(stored(1)))
    index.add_speculative("a", [3], ttl_s=5.0)
    index.remove("a")
    index.apply("c", batch(stored(9)))  # takes the freed slot
    assert index.match([1, 2, 3]) == {"b": 1} and index.match([9]) == {"c": 1}
    assert index.blocks("a") == 0


def test_more_engines_than_a_machine_word_has_bits():
    index = PrefixIndex()
    for engine in range(100):
        index.apply(f"e{engine}", batch(stored(*range(engine + 1))))
    matched = index.match(list(range(100)))
    assert matched == {f"e{engine}": engine + 1 for engine in range(100)}


# --- against a naive model -----------------------------------------------------------------------


class Model:
    """The same semantics, written for clarity: per engine an ordered dict hash -> expiry."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.engines: dict[str, OrderedDict[int, float | None]] = {}

    def hold(self, engine: str, block_hash: int, expiry: float | None) -> None:
        lru = self.engines.setdefault(engine, OrderedDict())
        current = lru.pop(block_hash, "absent")
        if current != "absent" and (current is None or expiry is None):
            expiry = None
        elif current != "absent":
            expiry = max(current, expiry)
        lru[block_hash] = expiry
        while len(lru) > self.capacity:
            lru.popitem(last=False)

    def match(self, hashes: list[int], now: float) -> dict[str, int]:
        matched = {}
        for engine, lru in self.engines.items():
            depth = 0
            for block_hash in hashes:
                if block_hash not in lru:
                    break
                expiry = lru[block_hash]
                if expiry is not None and expiry <= now:
                    break
                depth += 1
            if depth:
                matched[engine] = depth
        return matched


engines = st.sampled_from(["a", "b", "c"])
hashes = st.lists(st.integers(0, 7), max_size=5)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("store"), engines, hashes),
        st.tuples(st.just("remove"), engines, hashes),
        st.tuples(st.just("clear"), engines, st.just([])),
        st.tuples(st.just("speculate"), engines, hashes),
        st.tuples(st.just("leave"), engines, st.just([])),
        st.tuples(st.just("wait"), st.just(""), st.just([])),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(operations, st.lists(hashes, min_size=1, max_size=4))
def test_the_index_answers_like_a_naive_model(ops, requests):
    clock = Clock()
    index, model = PrefixIndex(default_capacity_blocks=5, clock=clock), Model(5)
    for op, engine, block_hashes in ops:
        if op == "wait":
            clock.now += 0.7
            continue
        # the model drops expired entries lazily too: purge them before any change
        for lru in model.engines.values():
            for gone in [h for h, e in lru.items() if e is not None and e <= clock.now]:
                del lru[gone]
        if op == "store":
            index.apply(engine, batch(stored(*block_hashes)))
            for block_hash in block_hashes:
                model.hold(engine, block_hash, None)
        elif op == "remove":
            index.apply(engine, batch(removed(*block_hashes)))
            for block_hash in block_hashes:
                model.engines.get(engine, {}).pop(block_hash, None)
        elif op == "clear":
            index.apply(engine, batch(AllBlocksCleared()))
            model.engines.get(engine, OrderedDict()).clear()
        elif op == "speculate":
            index.add_speculative(engine, block_hashes, ttl_s=1.0)
            for block_hash in block_hashes:
                model.hold(engine, block_hash, clock.now + 1.0)
        else:
            index.remove(engine)
            model.engines.pop(engine, None)
        for request in requests:
            assert index.match(request) == model.match(request, clock.now)
