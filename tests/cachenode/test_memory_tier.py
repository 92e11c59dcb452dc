"""The memory tier under its byte budget, and the LRU policy that picks what it gives up."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.cachenode.eviction import LRUPolicy
from kvcache.cachenode.memory_tier import (
    ENTRY_OVERHEAD_BYTES,
    FRAME_OVERHEAD_BYTES,
    MemoryTier,
    StoredValue,
)
from kvcache.core.protocol import ValueInfo


def key(index: int) -> bytes:
    return index.to_bytes(32, "big")


def charge(size: int, frames: int = 1) -> int:
    return size + ENTRY_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES * frames


def put(tier: MemoryTier, index: int, size: int, frames: int = 1, meta=None) -> bool:
    parts = []
    if frames:
        step = size // frames
        parts = [b"x" * step] * (frames - 1) + [b"x" * (size - step * (frames - 1))]
    info = ValueInfo(size, frames, index, meta or {})
    return tier.put(key(index), parts, info)


# ---- accounting ----------------------------------------------------------------------------


def test_a_value_is_charged_its_size_plus_entry_and_per_frame_overhead():
    value = StoredValue((b"ab", b"cde"), ValueInfo(5, 2, 0))
    assert value.charged_bytes == 5 + ENTRY_OVERHEAD_BYTES + 2 * FRAME_OVERHEAD_BYTES
    tier = MemoryTier(1 << 20)
    assert put(tier, 1, 1000, frames=4)
    assert tier.used_bytes == charge(1000, 4)


def test_stored_value_keeps_its_frames_and_info():
    tier = MemoryTier(1 << 20)
    info = ValueInfo(5, 2, 77, {"depth": 3})
    assert tier.put(key(1), [b"ab", b"cde"], info)
    stored = tier.get(key(1))
    assert stored is not None and stored.frames == (b"ab", b"cde") and stored.info == info
    assert key(1) in tier and len(tier) == 1
    assert tier.get(key(2)) is None and key(2) not in tier


def test_delete_frees_the_charge_and_reports_whether_the_key_was_there():
    tier = MemoryTier(1 << 20)
    put(tier, 1, 100)
    put(tier, 2, 200)
    assert tier.delete(key(1)) is True
    assert tier.used_bytes == charge(200)
    assert tier.delete(key(1)) is False
    assert tier.delete(key(2)) is True
    assert tier.used_bytes == 0 and len(tier) == 0
    assert tier.evictions == 0


def test_overwriting_a_key_recharges_it_at_its_new_size():
    tier = MemoryTier(1 << 20)
    put(tier, 1, 1000, frames=1)
    put(tier, 2, 10)
    assert put(tier, 1, 50, frames=2)
    assert tier.used_bytes == charge(50, 2) + charge(10)
    assert len(tier) == 2
    assert tier.get(key(1)).info.size == 50
    assert put(tier, 1, 5000, frames=3)
    assert tier.used_bytes == charge(5000, 3) + charge(10)
    assert tier.evictions == 0


def test_overwriting_a_key_never_evicts_the_key_itself_and_counts_only_others():
    budget = charge(100) * 3
    tier = MemoryTier(budget)
    for index in range(3):
        assert put(tier, index, 100)
    # Growing key 0 to fill the whole budget evicts the two others, not key 0 a second time.
    assert put(tier, 0, budget - charge(0))
    assert tier.used_bytes == budget
    assert [key(i) in tier for i in range(3)] == [True, False, False]
    assert tier.evictions == 2


# ---- the budget ----------------------------------------------------------------------------


def test_a_value_larger_than_the_whole_budget_is_refused_and_nothing_is_evicted():
    budget = 10_000
    tier = MemoryTier(budget)
    assert put(tier, 1, 100)
    used = tier.used_bytes
    assert not put(tier, 2, budget)  # its overhead pushes it over
    assert not put(tier, 3, budget - charge(0) + 1)
    assert key(1) in tier and key(2) not in tier and key(3) not in tier
    assert tier.used_bytes == used and tier.evictions == 0


def test_a_value_of_exactly_the_budget_fits_by_evicting_everything_else():
    budget = 10_000
    tier = MemoryTier(budget)
    for index in range(5):
        put(tier, index, 100)
    assert put(tier, 99, budget - charge(0))
    assert tier.used_bytes == budget
    assert len(tier) == 1 and key(99) in tier
    assert tier.evictions == 5


def test_refused_overwrite_keeps_the_old_value():
    tier = MemoryTier(10_000)
    put(tier, 1, 100)
    assert not put(tier, 1, 20_000)
    assert tier.get(key(1)).info.size == 100
    assert tier.used_bytes == charge(100)


def test_a_zero_budget_stores_nothing():
    tier = MemoryTier(0)
    assert not put(tier, 1, 0, frames=0)
    assert len(tier) == 0 and tier.used_bytes == 0


def test_a_negative_budget_is_a_configuration_error():
    with pytest.raises(ValueError):
        MemoryTier(-1)


def test_evictions_are_counted_one_per_evicted_value():
    tier = MemoryTier(charge(100) * 4)
    for index in range(10):
        assert put(tier, index, 100)
    assert tier.evictions == 6
    assert len(tier) == 4
    assert [key(i) in tier for i in range(10)] == [False] * 6 + [True] * 4
    # One big value evicts as many as it needs, each counted.
    assert put(tier, 100, charge(100) * 3 - charge(0))
    assert tier.evictions == 6 + 3
    assert len(tier) == 2


# ---- LRU order -----------------------------------------------------------------------------


def test_the_least_recently_written_key_is_evicted_first():
    tier = MemoryTier(charge(100) * 3)
    for index in range(3):
        put(tier, index, 100)
    put(tier, 3, 100)
    assert [key(i) in tier for i in range(4)] == [False, True, True, True]


def test_a_read_makes_a_key_young():
    tier = MemoryTier(charge(100) * 3)
    for index in range(3):
        put(tier, index, 100)
    assert tier.get(key(0)) is not None  # 0 is now the youngest; 1 is the oldest
    put(tier, 3, 100)
    assert [key(i) in tier for i in range(4)] == [True, False, True, True]
    tier.get(key(2))
    put(tier, 4, 100)  # evicts 0 (older than 3 and 2)
    put(tier, 5, 100)  # evicts 3
    assert sorted(i for i in range(6) if key(i) in tier) == [2, 4, 5]


def test_a_missed_read_changes_nothing():
    tier = MemoryTier(charge(100) * 2)
    put(tier, 0, 100)
    put(tier, 1, 100)
    assert tier.get(key(7)) is None
    put(tier, 2, 100)
    assert [key(i) in tier for i in range(3)] == [False, True, True]


def test_an_overwrite_makes_a_key_young():
    tier = MemoryTier(charge(100) * 3)
    for index in range(3):
        put(tier, index, 100)
    put(tier, 0, 100)
    put(tier, 3, 100)
    assert [key(i) in tier for i in range(4)] == [True, False, True, True]


def test_lru_policy_names_the_oldest_key_without_removing_it():
    policy = LRUPolicy()
    assert policy.victim() is None
    for name in (b"a", b"b", b"c"):
        policy.inserted(name, {})
    assert policy.victim() == b"a"
    assert policy.victim() == b"a"
    policy.accessed(b"a")
    assert policy.victim() == b"b"
    policy.removed(b"b")
    assert policy.victim() == b"c"
    policy.inserted(b"c", {})  # a re-insert is a write: c becomes the youngest
    assert policy.victim() == b"a"


def test_lru_policy_ignores_keys_it_does_not_track():
    policy = LRUPolicy()
    policy.accessed(b"ghost")
    policy.removed(b"ghost")
    assert policy.victim() is None
    policy.inserted(b"a", {})
    policy.removed(b"a")
    assert policy.victim() is None


def test_lru_is_the_default_policy():
    assert isinstance(MemoryTier(1)._policy, LRUPolicy)


# ---- property: a model of LRU under a budget -----------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("put"),
            st.integers(0, 11),
            st.integers(0, 3000),
            st.integers(0, 4),
        ),
        st.tuples(st.just("get"), st.integers(0, 11)),
        st.tuples(st.just("delete"), st.integers(0, 11)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(0, 12_000), ops=operations)
def test_charged_bytes_never_exceed_the_budget_and_contents_follow_lru(budget, ops):
    tier = MemoryTier(budget)
    model: OrderedDict[int, int] = OrderedDict()  # key index -> charge, oldest first
    evictions = 0
    for op in ops:
        match op:
            case ("put", index, size, frames):
                frames = max(frames, 1) if size else frames
                cost = charge(size, frames)
                accepted = put(tier, index, size, frames)
                assert accepted == (cost <= budget)
                if accepted:
                    model.pop(index, None)
                    while sum(model.values()) + cost > budget:
                        model.popitem(last=False)
                        evictions += 1
                    model[index] = cost
            case ("get", index):
                found = tier.get(key(index))
                assert (found is not None) == (index in model)
                if index in model:
                    model.move_to_end(index)
            case ("delete", index):
                assert tier.delete(key(index)) == (index in model)
                model.pop(index, None)
        assert 0 <= tier.used_bytes <= budget
        assert tier.used_bytes == sum(model.values())
        assert len(tier) == len(model)
        assert all((key(i) in tier) == (i in model) for i in range(12))
        assert tier.evictions == evictions
