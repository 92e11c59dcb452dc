"""The memory tier over the disk tier: spills, promotion, both tiers seen by CONTAINS and DELETE,
and the memory budget held exactly throughout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from sample_keys import make_keys

from kvcache.cachenode.disk_tier import DiskTier
from kvcache.cachenode.memory_tier import ENTRY_OVERHEAD_BYTES, FRAME_OVERHEAD_BYTES, MemoryTier
from kvcache.cachenode.tiered_store import TieredStore
from kvcache.core.checksum import checksum
from kvcache.core.protocol import ValueInfo

KiB, MiB = 1 << 10, 1 << 20
VALUE_BYTES = 100 * KiB
CHARGE = VALUE_BYTES + ENTRY_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES


def payload(key: bytes, size: int = VALUE_BYTES, version: int = 0) -> bytes:
    seed = xxhash.xxh3_128_digest(key + bytes([version]))
    return seed * (size // 16) + seed[: size % 16]


def put(store: TieredStore, key: bytes, value: bytes) -> bool:
    return store.put(key, [value], ValueInfo(len(value), 1, checksum([value]), {"depth": 1}))


def read(store: TieredStore, key: bytes) -> bytes | None:
    value = store.get(key)
    return None if value is None else b"".join(value.frames)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TieredStore]:
    """Room for 4 values in memory and 20 on disk."""
    built = TieredStore(MemoryTier(4 * CHARGE), DiskTier(tmp_path, 20 * 104 * KiB))
    yield built
    built.close()


def test_memory_victims_spill_to_disk_and_are_served_from_there(store):
    keys = make_keys(10, "spill")
    for key in keys:
        assert put(store, key, payload(key))
        assert store.memory.used_bytes <= store.memory.budget_bytes
    assert len(store.memory) == 4 and len(store.disk) == 6 and store.disk.writes == 6
    assert all(key in store for key in keys)
    assert [read(store, key) for key in keys] == [payload(key) for key in keys]
    assert store.disk.hits >= 6


def test_a_disk_hit_is_promoted_and_pushes_the_coldest_value_down(store):
    keys = make_keys(5, "promote")
    for key in keys:
        put(store, key, payload(key))
    assert keys[0] not in store.memory and keys[0] in store.disk
    assert read(store, keys[0]) == payload(keys[0])
    assert store.promotions == 1 and keys[0] in store.memory
    assert keys[1] not in store.memory and keys[1] in store.disk  # the LRU went down
    assert store.memory.used_bytes == 4 * CHARGE
    # The promoted value keeps its disk record: evicting it again writes nothing.
    writes = store.disk.writes
    for key in make_keys(4, "push"):
        put(store, key, payload(key))
    assert keys[0] not in store.memory and keys[0] in store.disk
    assert store.disk.writes == writes + 3  # keys 2-4 pushed down; keys[0] was already there


def test_contains_and_delete_see_both_tiers(store):
    keys = make_keys(6, "both")
    for key in keys:
        put(store, key, payload(key))
    on_disk, in_memory = keys[0], keys[-1]
    assert on_disk in store and in_memory in store
    assert store.delete(on_disk) and store.delete(in_memory)
    assert on_disk not in store and in_memory not in store
    assert not store.delete(on_disk)
    assert read(store, on_disk) is None and read(store, in_memory) is None


def test_a_promoted_value_deleted_is_gone_from_both_tiers(store):
    keys = make_keys(5, "promoted-delete")
    for key in keys:
        put(store, key, payload(key))
    read(store, keys[0])
    assert keys[0] in store.memory and keys[0] in store.disk
    assert store.delete(keys[0])
    assert keys[0] not in store.memory and keys[0] not in store.disk


def test_a_new_value_under_a_spilled_key_replaces_its_disk_record(store):
    keys = make_keys(5, "replace")
    for key in keys:
        put(store, key, payload(key))
    assert keys[0] in store.disk
    assert put(store, keys[0], payload(keys[0], version=1))
    assert keys[0] not in store.disk  # the old bytes can never come back, even after a crash
    assert read(store, keys[0]) == payload(keys[0], version=1)


def test_a_value_too_large_for_memory_goes_straight_to_disk(store):
    (key,) = make_keys(1, "large")
    large = payload(key, 5 * CHARGE)
    assert put(store, key, large)
    assert key not in store.memory and key in store.disk
    assert read(store, key) == large and store.promotions == 0


def test_the_memory_budget_holds_exactly_through_mixed_traffic(store):
    keys = make_keys(40, "mixed")
    for round_ in range(3):
        for index, key in enumerate(keys):
            if (index + round_) % 3 == 0:
                read(store, key)
            elif (index + round_) % 7 == 0:
                store.delete(key)
            else:
                put(store, key, payload(key))
            assert store.memory.used_bytes <= store.memory.budget_bytes
            assert store.disk.used_bytes <= store.disk.budget_bytes
    for key in keys:
        got = read(store, key)
        assert got is None or got == payload(key)


def test_a_store_without_disk_is_the_memory_tier_alone():
    store = TieredStore(MemoryTier(2 * CHARGE))
    keys = make_keys(3, "memory-only")
    for key in keys:
        assert put(store, key, payload(key))
    assert [key in store for key in keys] == [False, True, True]
    assert read(store, keys[0]) is None
