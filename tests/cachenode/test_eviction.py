"""Eviction policies through the memory tier: the prefix-aware order (cold and deep first), LRU
as the baseline it must beat on prefix chains, selection by name, and a model of the policy's
order and bookkeeping under random operations."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.cachenode.eviction import (
    LRUPolicy,
    PrefixAwarePolicy,
    chunk_depth,
    make_policy,
)
from kvcache.cachenode.launcher import LocalCluster
from kvcache.cachenode.memory_tier import ENTRY_OVERHEAD_BYTES, FRAME_OVERHEAD_BYTES, MemoryTier
from kvcache.cachenode.node import CacheNode
from kvcache.client.cluster import ClusterClient
from kvcache.core.config import NodeConfig
from kvcache.core.keys import Namespace, chunk_keys
from kvcache.core.protocol import ValueInfo

SIZE = 100
CHARGE = SIZE + ENTRY_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES


def key(index: int) -> bytes:
    return index.to_bytes(32, "big")


def put(tier: MemoryTier, index: int, meta: object = None, size: int = SIZE) -> bool:
    info = ValueInfo(size, 1, index, meta if meta is not None else {})  # type: ignore[arg-type]
    return tier.put(key(index), [b"x" * size], info)


def held(tier: MemoryTier, indices: range | list[int]) -> list[int]:
    return [index for index in indices if key(index) in tier]


def prefix_tier(slots: int, depth_weight: int = 2) -> MemoryTier:
    return MemoryTier(CHARGE * slots, PrefixAwarePolicy(depth_weight))


def write_chain(tier: MemoryTier, first: int, length: int) -> None:
    """One pass that stores a prompt's chunks in depth order, as an engine's PUT does."""
    for depth in range(length):
        assert put(tier, first + depth, {"depth": depth})


# ---- victim order ----------------------------------------------------------------------------


def test_a_full_tier_gives_up_the_deepest_chunk_of_a_chain_not_its_head():
    tier = prefix_tier(4)
    write_chain(tier, 0, 4)
    put(tier, 100, {"depth": 0})
    assert held(tier, range(4)) == [0, 1, 2]  # depth 3 went; the chain still hits 3 chunks


def test_lru_gives_up_the_head_of_a_chain_and_keeps_its_unreachable_tail():
    tier = MemoryTier(CHARGE * 4, LRUPolicy())
    write_chain(tier, 0, 4)
    put(tier, 100, {"depth": 0})
    assert held(tier, range(4)) == [1, 2, 3]  # a prefix walk now stops at chunk 0: no hit


def test_a_chain_longer_than_the_tier_keeps_its_head():
    tier = prefix_tier(10)
    write_chain(tier, 0, 30)
    # Each new chunk pushes out the deepest so far: the head survives a pass over a chain the
    # tier cannot hold, where LRU would keep only the last ten (and so nothing reachable).
    assert held(tier, range(9)) == list(range(9))
    assert len(tier) == 10 and key(29) in tier


def test_recency_rules_across_passes_once_the_age_gap_exceeds_the_depth_credit():
    tier = prefix_tier(6, depth_weight=1)
    write_chain(tier, 0, 3)  # old pass: depths 0..2, ranks 1-0, 2-1, 3-2 = 1, 1, 1
    for filler in range(3):  # three unrelated depth-0 chunks: ranks 4, 5, 6
        put(tier, 50 + filler, {"depth": 0})
    put(tier, 60, {"depth": 2})  # rank 7 - 2 = 5: newer than the whole old chain
    # The old chain leaves, deepest first, before anything touched later.
    assert held(tier, range(3)) == [0, 1]
    put(tier, 61, {"depth": 0})
    put(tier, 62, {"depth": 0})
    assert held(tier, range(3)) == []
    assert held(tier, [50, 51, 52, 60, 61, 62]) == [50, 51, 52, 60, 61, 62]


@pytest.mark.parametrize("gap, first_out", [(5, b"deep"), (8, b"deep"), (9, b"shallow")])
def test_a_deep_chunk_ranks_as_touched_earlier_by_weight_times_depth(gap, first_out):
    # depth_weight 4, depth 2: the deep chunk counts as touched 8 touches before it was. Written
    # `gap` touches after the shallow one it goes first up to a gap of 8 (a tie: deeper first).
    policy = PrefixAwarePolicy(depth_weight=4)
    policy.inserted(b"shallow", {"depth": 0})
    policy.inserted(b"other", {"depth": 0})
    for _ in range(gap - 2):
        policy.accessed(b"other")
    policy.inserted(b"deep", {"depth": 2})
    policy.removed(b"other")
    assert policy.victim() == first_out


def test_equal_ranks_give_up_the_deeper_chunk_first():
    tier = prefix_tier(2, depth_weight=1)
    put(tier, 1, {"depth": 0})  # rank 1 - 0 = 1
    put(tier, 2, {"depth": 1})  # rank 2 - 1 = 1, deeper
    put(tier, 3, {"depth": 0})
    assert held(tier, [1, 2, 3]) == [1, 3]


def test_equal_ranks_and_depths_give_up_the_older_touch_first():
    tier = prefix_tier(2)
    put(tier, 1, {"depth": 0})
    put(tier, 2, {"depth": 0})
    put(tier, 3, {"depth": 0})
    assert held(tier, [1, 2, 3]) == [2, 3]
    policy = PrefixAwarePolicy(depth_weight=0)  # no depth credit: exactly LRU order
    for name in (b"a", b"b", b"c"):
        policy.inserted(name, {"depth": 7})
    assert policy.victim() == b"a"


# ---- touches -----------------------------------------------------------------------------------


def test_a_read_chunk_survives_and_keeps_its_depth():
    tier = prefix_tier(4, depth_weight=1)  # the chain's ranks all equal 1; the read makes 3's 2
    write_chain(tier, 0, 4)
    assert tier.get(key(3)) is not None  # the deepest chunk, read again: young now
    put(tier, 100, {"depth": 0})
    assert held(tier, range(4)) == [0, 1, 3]  # depth 2 was the coldest deep one
    policy = tier._policy
    assert isinstance(policy, PrefixAwarePolicy)
    assert policy._touches[key(3)].depth == 3  # a read has no meta; the depth is remembered


def test_a_pass_that_rereads_a_chain_makes_it_younger_than_a_chunk_written_before():
    tier = prefix_tier(5, depth_weight=1)
    write_chain(tier, 0, 4)
    put(tier, 100, {"depth": 0})
    for depth in range(4):
        tier.get(key(depth))  # an engine's GET of the hit prefix
    put(tier, 101, {"depth": 0})
    assert key(100) not in tier and held(tier, range(4)) == [0, 1, 2, 3]


def test_a_missed_read_and_a_read_of_an_untracked_key_change_nothing():
    policy = PrefixAwarePolicy()
    policy.accessed(b"ghost")
    policy.removed(b"ghost")
    assert policy.victim() is None and len(policy) == 0
    tier = prefix_tier(2)
    put(tier, 1, {"depth": 0})
    put(tier, 2, {"depth": 0})
    assert tier.get(key(9)) is None
    put(tier, 3, {"depth": 0})
    assert held(tier, [1, 2, 3]) == [2, 3]


def test_an_overwrite_takes_the_new_depth():
    tier = prefix_tier(2, depth_weight=1)
    put(tier, 1, {"depth": 5})
    put(tier, 2, {"depth": 0})
    put(tier, 1, {"depth": 0})  # rewritten as a shallow chunk: now younger than 2
    put(tier, 3, {"depth": 0})
    assert held(tier, [1, 2, 3]) == [1, 3]


# ---- metadata a client may send ----------------------------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [{}, {"depth": None}, {"depth": "3"}, {"depth": 2.5}, {"depth": True}, {"depth": -4},
     {"depth": [1]}, {b"depth": 3}, {"other": 1}, [], "depth", None],
)  # fmt: skip
def test_meta_without_a_non_negative_int_depth_counts_as_depth_zero(meta):
    assert chunk_depth(meta) == 0
    policy = PrefixAwarePolicy()
    policy.inserted(b"bad", meta)
    policy.inserted(b"deep", {"depth": 1})
    assert policy.victim() == b"deep"


def test_huge_depths_are_ordered_not_refused():
    tier = prefix_tier(2)
    put(tier, 1, {"depth": 2**64 - 1})  # the largest msgpack uint
    put(tier, 2, {"depth": 0})
    put(tier, 3, {"depth": 0})
    assert held(tier, [1, 2, 3]) == [2, 3]
    assert chunk_depth({"depth": 7}) == 7


def test_a_negative_depth_weight_is_a_configuration_error():
    with pytest.raises(ValueError):
        PrefixAwarePolicy(depth_weight=-1)


# ---- removal and size --------------------------------------------------------------------------


def test_a_removed_key_is_never_named_again():
    tier = prefix_tier(8)
    write_chain(tier, 0, 4)
    policy = tier._policy
    assert policy.victim() == key(3)
    assert tier.delete(key(3)) and tier.delete(key(2))
    assert policy.victim() == key(1)
    for depth in range(2):
        tier.delete(key(depth))
    assert policy.victim() is None and len(policy) == 0


def test_many_keys_and_rereads_keep_the_heap_bounded_and_the_order_exact():
    policy = PrefixAwarePolicy()
    count = 5000
    for index in range(count):
        policy.inserted(key(index), {"depth": index % 40})
    for offset in range(4):  # re-reads leave stale entries that compaction must clear
        for index in range(offset, count, 3):
            policy.accessed(key(index))
    assert len(policy._heap) <= 2 * len(policy) + 64

    def rank(name: bytes) -> tuple[int, int, int]:
        touch = policy._touches[name]
        return (touch.clock - policy.depth_weight * touch.depth, -touch.depth, touch.clock)

    expected = sorted(policy._touches, key=rank)
    for name in expected[:200]:
        assert policy.victim() == name
        policy.removed(name)


def test_a_tier_full_of_one_chain_evicts_in_logarithmic_time():
    # 20,000 inserts into a full tier, each evicting one: fast only without per-call scans.
    tier = prefix_tier(2000)
    write_chain(tier, 0, 20_000)
    assert len(tier) == 2000 and tier.evictions == 18_000
    assert held(tier, range(1999)) == list(range(1999))


# ---- selection by name -------------------------------------------------------------------------


def test_make_policy_builds_a_fresh_policy_per_call_by_name():
    first, second = make_policy("prefix"), make_policy("prefix")
    assert isinstance(first, PrefixAwarePolicy) and first is not second
    assert isinstance(make_policy("lru"), LRUPolicy)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        make_policy("fifo")


@pytest.mark.parametrize("name, policy_type", [("prefix", PrefixAwarePolicy), ("lru", LRUPolicy)])
def test_a_node_uses_the_policy_its_config_names(name, policy_type):
    node = CacheNode(NodeConfig(node_id="n", memory_bytes=1 << 20, eviction=name))
    assert type(node.tier._policy) is policy_type


def test_prefix_is_the_default_policy_of_a_node():
    assert type(CacheNode(NodeConfig(node_id="n", memory_bytes=1 << 20)).tier._policy) is (
        PrefixAwarePolicy
    )


@pytest.mark.parametrize("policy, expected_hit", [("prefix", 14), ("lru", 0)])
def test_a_real_node_keeps_the_head_of_a_prompt_longer_than_its_memory(policy, expected_hit):
    value = b"v" * (64 << 10)
    slots = 15
    memory = slots * (len(value) + ENTRY_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES)
    keys = chunk_keys(list(range(24 * 16)), Namespace(model="eviction-test"), chunk_tokens=16)
    with LocalCluster.start(1, memory, extra_args=["--eviction", policy]) as cluster:
        with ClusterClient(cluster.members) as client:
            assert all(client.put(keys, [value] * len(keys), [{"depth": i} for i in range(24)]))
            assert client.lookup_prefix(keys) == expected_hit


# ---- property: the policy's order and bookkeeping against a model ------------------------------

depths = st.one_of(st.integers(0, 6), st.sampled_from([None, -1, "2", 1.5, True]))
operations = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 9), st.integers(0, 3 * SIZE), depths),
        st.tuples(st.just("get"), st.integers(0, 9)),
        st.tuples(st.just("delete"), st.integers(0, 9)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(slots=st.integers(0, 6), weight=st.integers(0, 5), ops=operations)
def test_the_policy_tracks_exactly_the_tiers_keys_and_evicts_the_lowest_rank(slots, weight, ops):
    budget = CHARGE * slots
    tier = MemoryTier(budget, PrefixAwarePolicy(weight))
    policy = tier._policy
    model: dict[int, tuple[int, int, int]] = {}  # index -> (clock, depth, charge)
    clock = 0

    def rank(index: int) -> tuple[int, int, int]:
        touched, depth, _ = model[index]
        return (touched - weight * depth, -depth, touched)

    for op in ops:
        match op:
            case ("put", index, size, depth):
                cost = size + ENTRY_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES
                accepted = put(tier, index, {"depth": depth}, size)
                assert accepted == (cost <= budget)
                if accepted:
                    model.pop(index, None)
                    while sum(charge for *_, charge in model.values()) + cost > budget:
                        del model[min(model, key=rank)]
                    clock += 1
                    model[index] = (clock, chunk_depth({"depth": depth}), cost)
            case ("get", index):
                assert (tier.get(key(index)) is not None) == (index in model)
                if index in model:
                    clock += 1
                    model[index] = (clock, *model[index][1:])
            case ("delete", index):
                assert tier.delete(key(index)) == (index in model)
                model.pop(index, None)
        assert set(policy._touches) == {key(index) for index in model}
        assert held(tier, range(10)) == sorted(model)
        assert tier.used_bytes == sum(charge for *_, charge in model.values()) <= budget
        expected = key(min(model, key=rank)) if model else None
        assert policy.victim() == expected
