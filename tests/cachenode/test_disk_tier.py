"""The disk tier on real files: budget, eviction, index rebuild, damaged and foreign records, and
encryption at rest. Every damaged record must be a counted miss whose file is gone, never bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import xxhash
import zmq
from sample_keys import make_keys

from kvcache.cachenode.at_rest import AtRestCipher
from kvcache.cachenode.disk_tier import (
    BLOCK_BYTES,
    HEAD_CHECKSUM,
    PREFIX,
    DiskTier,
)
from kvcache.cachenode.eviction import make_policy
from kvcache.core.checksum import checksum
from kvcache.core.protocol import ValueInfo

KiB, MiB = 1 << 10, 1 << 20


def payload(key: bytes, size: int) -> bytes:
    """Bytes that only this key and size produce, so a mixed-up record cannot pass for another."""
    return xxhash.xxh3_128_digest(key) * (size // 16) + key[: size % 16]


def put(tier: DiskTier, key: bytes, value: bytes, frame_bytes: int = 2 * MiB, meta=None) -> bool:
    frames = [value[i : i + frame_bytes] for i in range(0, len(value), frame_bytes)]
    info = ValueInfo(len(value), len(frames), checksum([value]), meta or {})
    return tier.put(key, frames, info)


def read(tier: DiskTier, key: bytes) -> bytes | None:
    value = tier.get(key)
    return None if value is None else b"".join(value.frames)


def record_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/*.kv"))


def path_of(directory: Path, key: bytes) -> Path:
    return directory / key.hex()[:2] / f"{key.hex()}.kv"


@pytest.fixture
def open_tier(tmp_path: Path) -> Iterator[Any]:
    """`open_tier(budget, cipher=None, policy=None)` on tmp_path; closed after the test."""
    opened: list[DiskTier] = []

    def open_(budget: int = 64 * MiB, **kwargs: Any) -> DiskTier:
        tier = DiskTier(tmp_path, budget, **kwargs)
        opened.append(tier)
        return tier

    yield open_
    for tier in opened:
        tier.close()


def reopen(tier: DiskTier, **kwargs: Any) -> DiskTier:
    tier.close()
    return DiskTier(tier.directory, tier.budget_bytes, **kwargs)


# ---- storing and reading -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 64 * KiB, 2 * MiB, 5 * MiB + 3])
def test_values_of_every_size_round_trip_with_their_info(open_tier, size):
    tier = open_tier()
    (key,) = make_keys(1, f"size{size}")
    value = payload(key, size)
    assert put(tier, key, value, meta={"depth": 7})
    stored = tier.get(key)
    assert stored is not None and b"".join(stored.frames) == value
    assert stored.info.size == size and stored.info.checksum == checksum([value])
    assert stored.info.meta == {"depth": 7}
    assert stored.info.frames == len(stored.frames) == -(-size // (2 * MiB))
    assert all(0 < len(frame) <= 2 * MiB for frame in stored.frames)
    assert key in tier and len(tier) == 1 and tier.hits == 1


def test_a_value_whose_bytes_do_not_match_its_checksum_is_not_written(open_tier, tmp_path):
    tier = open_tier()
    (key,) = make_keys(1, "liar")
    assert not tier.put(key, [b"abc"], ValueInfo(3, 1, checksum([b"abd"])))
    assert tier.rejected == 1 and key not in tier and record_files(tmp_path) == []


def test_zmq_frames_are_written_without_joining_them(open_tier):
    tier = open_tier()
    (key,) = make_keys(1, "frames")
    value = payload(key, 3 * MiB)
    frames = [zmq.Frame(value[: 2 * MiB]), zmq.Frame(value[2 * MiB :])]
    assert tier.put(key, frames, ValueInfo(len(value), 2, checksum([value])))
    assert read(tier, key) == value


# ---- budget and eviction -------------------------------------------------------------------


def test_the_budget_holds_and_the_least_recently_used_record_goes_first(open_tier, tmp_path):
    budget = 10 * 68 * KiB
    tier = open_tier(budget)
    keys = make_keys(30, "budget")
    for index, key in enumerate(keys):
        assert put(tier, key, payload(key, 64 * KiB))
        assert tier.used_bytes <= budget
        if index >= 1:
            assert read(tier, keys[0]) is not None  # key 0 stays the youngest
    assert len(tier) == 10 and tier.evictions == 20
    assert keys[0] in tier and keys[1] not in tier and keys[-1] in tier
    files = record_files(tmp_path)
    assert len(files) == 10
    assert tier.used_bytes == sum(-(-f.stat().st_size // BLOCK_BYTES) * BLOCK_BYTES for f in files)


class NewestFirst:
    """An eviction policy that gives up the newest key: proves the tier asks the policy it got."""

    def __init__(self) -> None:
        self.order: list[bytes] = []
        self.metas: list[dict] = []

    def inserted(self, key: bytes, meta: dict[str, Any]) -> None:
        self.removed(key)
        self.order.append(key)
        self.metas.append(meta)

    def accessed(self, key: bytes) -> None:
        """Reads do not matter to this policy."""

    def removed(self, key: bytes) -> None:
        if key in self.order:
            self.order.remove(key)

    def victim(self) -> bytes | None:
        return self.order[-1] if self.order else None


def test_eviction_follows_the_policy_object_given(open_tier):
    policy = NewestFirst()
    tier = open_tier(3 * 68 * KiB, policy=policy)
    keys = make_keys(5, "policy")
    for depth, key in enumerate(keys):
        assert put(tier, key, payload(key, 64 * KiB), meta={"depth": depth})
    assert [key in tier for key in keys] == [True, True, False, False, True]
    assert policy.metas[0] == {"depth": 0}


@pytest.mark.parametrize("name", ["prefix", "lru"])
def test_each_configured_policy_names_the_disk_victims(open_tier, name):
    policy = make_policy(name)
    tier = open_tier(5 * 68 * KiB, policy=policy)
    keys = make_keys(12, f"configured-{name}")
    for depth, key in enumerate(keys):
        victim = policy.victim() if len(tier) == 5 else None
        assert put(tier, key, payload(key, 64 * KiB), meta={"depth": depth % 4})
        assert len(tier) == min(depth + 1, 5)
        assert victim is None or victim not in tier


def test_a_value_larger_than_the_whole_budget_is_rejected(open_tier):
    tier = open_tier(1 * MiB)
    small, large = make_keys(2, "large")
    assert put(tier, small, payload(small, 1000))
    assert not put(tier, large, payload(large, 1 * MiB))
    assert tier.rejected == 1 and small in tier and large not in tier


def test_rewriting_a_key_with_the_same_value_writes_nothing(open_tier):
    tier = open_tier()
    (key,) = make_keys(1, "same")
    assert put(tier, key, payload(key, 5000))
    assert put(tier, key, payload(key, 5000))
    assert tier.writes == 1
    assert put(tier, key, payload(key, 6000))
    assert tier.writes == 2 and read(tier, key) == payload(key, 6000)


def test_delete_removes_the_file(open_tier, tmp_path):
    tier = open_tier()
    (key,) = make_keys(1, "delete")
    assert put(tier, key, payload(key, 5000))
    assert tier.delete(key) and not tier.delete(key)
    assert record_files(tmp_path) == [] and tier.used_bytes == 0


def test_a_second_tier_cannot_open_a_directory_in_use(open_tier, tmp_path):
    open_tier()
    with pytest.raises(RuntimeError, match="in use"):
        DiskTier(tmp_path, MiB)


# ---- restart -------------------------------------------------------------------------------


def test_a_fresh_instance_rebuilds_the_index_and_serves_every_record(open_tier, tmp_path):
    tier = open_tier()
    keys = make_keys(40, "rebuild")
    sizes = [(index * 7919) % (300 * KiB) for index in range(len(keys))]
    for key, size in zip(keys, sizes):
        assert put(tier, key, payload(key, size), meta={"depth": size % 5})
    used, count = tier.used_bytes, len(tier)
    fresh = reopen(tier)
    try:
        assert (len(fresh), fresh.used_bytes) == (count, used)
        for key, size in zip(keys, sizes):
            stored = fresh.get(key)
            assert stored is not None and b"".join(stored.frames) == payload(key, size)
            assert stored.info.meta == {"depth": size % 5}
        assert fresh.corrupt_dropped == 0
    finally:
        fresh.close()


def test_a_restart_with_a_smaller_budget_evicts_the_oldest_down_to_it(open_tier):
    tier = open_tier(10 * MiB)
    keys = make_keys(10, "shrink")
    for key in keys:
        assert put(tier, key, payload(key, 100 * KiB))
    tier.close()
    smaller = DiskTier(tier.directory, 5 * 104 * KiB)
    try:
        assert smaller.used_bytes <= 5 * 104 * KiB
        assert [key in smaller for key in keys] == [False] * 5 + [True] * 5
    finally:
        smaller.close()


def test_temp_files_left_by_a_crash_are_removed_and_never_served(open_tier, tmp_path):
    tier = open_tier()
    keys = make_keys(2, "temp")
    assert put(tier, keys[0], payload(keys[0], 5000))
    tier.close()
    # A complete record under its temp name (killed between write and rename), and a cut one.
    complete = path_of(tmp_path, keys[0]).read_bytes()
    path_of(tmp_path, keys[0]).rename(path_of(tmp_path, keys[1]).with_suffix(".tmp"))
    path_of(tmp_path, keys[0]).with_suffix(".tmp").write_bytes(complete[:100])
    fresh = DiskTier(tmp_path, tier.budget_bytes)
    try:
        assert len(fresh) == 0 and list(tmp_path.glob("*/*.tmp")) == []
        assert fresh.get(keys[0]) is None and fresh.get(keys[1]) is None
    finally:
        fresh.close()


# ---- damaged records -----------------------------------------------------------------------


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    body = len(data) - 1000  # records in these tests end with a 1000-byte body (or ciphertext)
    match how:
        case "truncated_body":
            del data[-1:]
        case "truncated_head":
            del data[20:]
        case "empty":
            data = bytearray()
        case "grown":
            data += b"\0"
        case "flipped_body":
            data[body + 500] ^= 0x10
        case "flipped_head":
            data[PREFIX.size + HEAD_CHECKSUM.size + 3] ^= 0x01
        case "flipped_magic":
            data[0] ^= 0x80
    path.write_bytes(bytes(data))


DAMAGES = [
    "truncated_body",
    "truncated_head",
    "empty",
    "grown",
    "flipped_body",
    "flipped_head",
    "flipped_magic",
]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("when", ["while_running", "before_restart"])
def test_a_damaged_record_is_a_counted_miss_and_its_file_is_removed(
    open_tier, tmp_path, how, when, encrypted
):
    cipher = AtRestCipher(bytes(range(32))) if encrypted else None
    tier = open_tier(cipher=cipher)
    damaged, intact = make_keys(2, f"damage{how}")
    body_bytes = 1000 - (16 if encrypted else 0)
    assert put(tier, damaged, payload(damaged, body_bytes))
    assert put(tier, intact, payload(intact, body_bytes))
    damage(path_of(tmp_path, damaged), how)
    if when == "before_restart":
        tier = reopen(tier, cipher=cipher)
    try:
        assert tier.get(damaged) is None
        assert damaged not in tier and tier.corrupt_dropped == 1
        assert not path_of(tmp_path, damaged).exists()
        assert read(tier, intact) == payload(intact, body_bytes)
    finally:
        if when == "before_restart":
            tier.close()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_no_single_bit_flip_or_truncation_anywhere_in_a_record_is_ever_served(tmp_path, encrypted):
    """Every bit of a small record flipped in turn, and every shorter length: all misses."""
    cipher = AtRestCipher(bytes(32)) if encrypted else None
    (key,) = make_keys(1, "sweep")
    value = payload(key, 48)
    tier = DiskTier(tmp_path, MiB, cipher=cipher)
    try:
        assert put(tier, key, value, meta={"depth": 3})
        path = path_of(tmp_path, key)
        original = path.read_bytes()
        damaged_records = [original[:length] for length in range(len(original))]
        for bit in range(len(original) * 8):
            flipped = bytearray(original)
            flipped[bit // 8] ^= 1 << (bit % 8)
            damaged_records.append(bytes(flipped))
        served = 0
        for record in damaged_records:
            assert put(tier, key, value, meta={"depth": 3})
            path.write_bytes(record)
            got = tier.get(key)
            served += got is not None
        assert served == 0
        assert tier.corrupt_dropped == len(damaged_records)
    finally:
        tier.close()


def test_another_keys_intact_record_under_a_keys_name_is_never_served_for_it(open_tier, tmp_path):
    """Its checksum matches its own bytes, so only the key in its header can give it away."""
    tier = open_tier()
    source, target = make_keys(2, "swapped")
    for key in (source, target):
        assert put(tier, key, payload(key, 5000))
    path_of(tmp_path, source).replace(path_of(tmp_path, target))
    assert tier.get(target) is None and tier.corrupt_dropped == 1


def test_an_older_record_of_the_same_key_put_back_is_never_served(open_tier, tmp_path):
    tier = open_tier()
    (key,) = make_keys(1, "older")
    assert put(tier, key, payload(key, 5000))
    older = path_of(tmp_path, key).read_bytes()
    assert put(tier, key, payload(key, 6000))
    path_of(tmp_path, key).write_bytes(older)
    assert tier.get(key) is None and tier.corrupt_dropped == 1


def test_a_record_in_the_wrong_shard_is_dropped_at_start(open_tier, tmp_path):
    tier = open_tier()
    (key,) = make_keys(1, "shard")
    assert put(tier, key, payload(key, 5000))
    tier.close()
    wrong_shard = "00" if key.hex()[:2] != "00" else "01"
    misplaced = tmp_path / wrong_shard / path_of(tmp_path, key).name
    path_of(tmp_path, key).rename(misplaced)
    fresh = DiskTier(tmp_path, tier.budget_bytes)
    try:
        assert len(fresh) == 0 and fresh.corrupt_dropped == 1 and not misplaced.exists()
    finally:
        fresh.close()


def test_a_record_renamed_to_another_key_is_dropped_at_start(open_tier, tmp_path):
    tier = open_tier()
    source, target = make_keys(2, "moved")
    assert put(tier, source, payload(source, 5000))
    tier.close()
    path_of(tmp_path, source).rename(path_of(tmp_path, target))
    fresh = DiskTier(tmp_path, tier.budget_bytes)
    try:
        assert len(fresh) == 0 and fresh.corrupt_dropped == 1
        assert fresh.get(target) is None and record_files(tmp_path) == []
    finally:
        fresh.close()


# ---- encryption at rest --------------------------------------------------------------------


def test_encrypted_records_hold_no_plaintext_and_round_trip(open_tier, tmp_path):
    cipher = AtRestCipher(os.urandom(32))
    tier = open_tier(cipher=cipher)
    keys = make_keys(3, "secret")
    values = [os.urandom(200 * KiB) for _ in keys]
    for key, value in zip(keys, values):
        assert put(tier, key, value)
    for key, value in zip(keys, values):
        data = path_of(tmp_path, key).read_bytes()
        assert value[:64] not in data and value[-64:] not in data
        assert value[100 * KiB : 100 * KiB + 64] not in data
    fresh = reopen(tier, cipher=cipher)
    try:
        assert [read(fresh, key) for key in keys] == values
    finally:
        fresh.close()


def test_every_record_gets_its_own_nonce(open_tier, tmp_path):
    tier = open_tier(cipher=AtRestCipher(bytes(32)))
    keys = make_keys(2, "nonce")
    for key in keys:  # equal payloads under one key: only a fresh nonce makes them differ
        assert put(tier, key, b"\0" * 1000)
    first, second = (path_of(tmp_path, key).read_bytes() for key in keys)
    assert first[-1000:] != second[-1000:]


def test_a_wrong_key_turns_every_record_into_a_counted_miss(open_tier, tmp_path):
    tier = open_tier(cipher=AtRestCipher(os.urandom(32)))
    keys = make_keys(5, "wrongkey")
    for key in keys:
        assert put(tier, key, payload(key, 10 * KiB))
    fresh = reopen(tier, cipher=AtRestCipher(os.urandom(32)))
    try:
        assert [fresh.get(key) for key in keys] == [None] * 5
        assert fresh.corrupt_dropped == 5 and len(fresh) == 0 and record_files(tmp_path) == []
    finally:
        fresh.close()


@pytest.mark.parametrize("written_encrypted", [True, False], ids=["encrypted", "plain"])
def test_records_of_the_other_mode_are_never_read(open_tier, tmp_path, written_encrypted):
    """An encrypting tier never reads a plaintext record (one could be planted), nor the reverse."""
    cipher = AtRestCipher(os.urandom(32))
    tier = open_tier(cipher=cipher if written_encrypted else None)
    (key,) = make_keys(1, "mode")
    assert put(tier, key, payload(key, 5000))
    fresh = reopen(tier, cipher=None if written_encrypted else cipher)
    try:
        assert len(fresh) == 0 and fresh.corrupt_dropped == 1 and fresh.get(key) is None
    finally:
        fresh.close()


def test_an_edited_header_with_a_recomputed_head_checksum_fails_authentication(open_tier, tmp_path):
    """The header is GCM associated data: rewriting it (here the meta) and fixing up the head
    checksum, as an attacker with the file but not the key could, still yields a miss."""
    cipher = AtRestCipher(os.urandom(32))
    tier = open_tier(cipher=cipher)
    (key,) = make_keys(1, "aad")
    assert put(tier, key, payload(key, 5000), meta={"depth": 1})
    path = path_of(tmp_path, key)
    data = path.read_bytes()
    fixed = PREFIX.size + HEAD_CHECKSUM.size
    header_bytes = PREFIX.unpack_from(data)[3]
    fields = msgpack.unpackb(data[fixed : fixed + header_bytes])
    fields[4] = {"depth": 2}
    forged = msgpack.packb(fields, use_bin_type=True)
    assert len(forged) == header_bytes
    nonce_and_body = data[fixed + header_bytes :]
    head_checksum = xxhash.xxh3_64_intdigest(data[: PREFIX.size] + forged + nonce_and_body[:12])
    path.write_bytes(
        data[: PREFIX.size] + HEAD_CHECKSUM.pack(head_checksum) + forged + nonce_and_body
    )
    fresh = reopen(tier, cipher=cipher)
    try:
        assert key in fresh  # the head checks out; only the tag can tell
        assert fresh.get(key) is None and fresh.corrupt_dropped == 1
    finally:
        fresh.close()


# ---- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def tiny_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a disk that really fills up."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_full_disk_is_a_counted_write_error_never_an_exception(tiny_filesystem):
    tier = DiskTier(tiny_filesystem, 64 * MiB)  # a budget the file system cannot hold
    try:
        keys = make_keys(12, "full")
        stored = [put(tier, key, payload(key, 150 * KiB)) for key in keys]
        assert stored[0] and not all(stored)
        assert tier.write_errors == stored.count(False) > 0
        assert list(tiny_filesystem.glob("*/*.tmp")) == []
        for key, ok in zip(keys, stored):
            assert (read(tier, key) == payload(key, 150 * KiB)) if ok else tier.get(key) is None
        # Room again after a delete: writes succeed again.
        tier.delete(keys[0])
        assert put(tier, keys[-1], payload(keys[-1], 100 * KiB))
    finally:
        tier.close()


FSIZE_SCRIPT = """
import json, resource, sys
from kvcache.cachenode.disk_tier import DiskTier
from kvcache.core.checksum import checksum
from kvcache.core.protocol import ValueInfo
tier = DiskTier(sys.argv[1], 1 << 30)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
results = []
for index, size in enumerate([50_000, 200_000, 60_000, 150_000]):
    key, value = bytes([index]) * 32, bytes([index]) * size
    results.append(tier.put(key, [value], ValueInfo(size, 1, checksum([value]))))
print(json.dumps({"stored": results, "write_errors": tier.write_errors, "items": len(tier)}))
"""


def test_a_file_size_limit_is_a_counted_write_error_and_leaves_no_temp_file(tmp_path):
    """RLIMIT_FSIZE makes write() fail with EFBIG mid-record (Python ignores SIGXFSZ)."""
    directory = tmp_path / f"fsize-{uuid.uuid4().hex}"
    result = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"stored": [True, False, True, False], "write_errors": 2, "items": 2}
    assert list(directory.glob("*/*.tmp")) == []
    assert len(record_files(directory)) == 2
