"""Real `kvcache node` processes with a disk tier, killed with SIGKILL and restarted on the same
directory: what was on disk is served again, and no kill, wherever it lands, ever makes a node
serve wrong bytes afterwards. Also: a damaged record over the wire, the disk figures in /stats
and /metrics, and the flags a node refuses."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sample_keys import make_keys

from kvcache.cachenode.launcher import NodeProcess, free_port
from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig

KiB, MiB = 1 << 10, 1 << 20
KILLS = 20


def payload(key: bytes, size: int | None = None) -> bytes:
    """The only bytes ever written under `key` (its size, too, follows from the key)."""
    if size is None:
        size = 32 * KiB + int.from_bytes(key[:4], "little") % (224 * KiB)
    return random.Random(key).randbytes(size)


def stats(node: NodeProcess) -> dict:
    return httpx.get(f"{node.admin_url}/stats", timeout=5.0).json()


def metrics(node: NodeProcess) -> dict[str, float]:
    text = httpx.get(f"{node.admin_url}/metrics", timeout=5.0).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("kvcache_node_disk_")
    }


def on_disk(directory: Path, suffix: str = ".kv") -> set[str]:
    return {path.name.removesuffix(suffix) for path in directory.glob(f"*/*{suffix}")}


def kill_after(node: NodeProcess, delay_s: float) -> tuple[threading.Timer, threading.Event]:
    """SIGKILL the node from a timer thread after `delay_s`; the event is set once it is sent."""
    killed = threading.Event()
    process_id = node.process.pid

    def kill() -> None:
        os.kill(process_id, signal.SIGKILL)
        killed.set()

    killer = threading.Timer(delay_s, kill)
    killer.start()
    return killer, killed


@pytest.fixture
def disk_node(start_node, tmp_path: Path) -> Callable[..., NodeProcess]:
    """`disk_node(memory_bytes, disk_bytes, *flags)`: a ready node with its disk tier in
    tmp_path/disk; stopped after the test."""

    def start(memory_bytes: int, disk_bytes: int, *flags: str) -> NodeProcess:
        disk_flags = ("--disk-dir", str(tmp_path / "disk"), "--disk", str(disk_bytes))
        return start_node(*disk_flags, *flags, memory_bytes=memory_bytes)

    return start


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_chunks_on_disk_are_served_again_after_a_crash_and_restart(disk_node, tmp_path, encrypted):
    flags: tuple[str, ...] = ()
    if encrypted:
        key_file = tmp_path / "at-rest.key"
        key_file.write_text(os.urandom(32).hex())
        flags = ("--at-rest-key-file", str(key_file))
    node = disk_node(4 * MiB, 256 * MiB, *flags)
    keys = make_keys(300, "restart")
    with ClusterClient([node.member]) as client:
        for start in range(0, len(keys), 20):
            batch = keys[start : start + 20]
            assert client.put(batch, [payload(key) for key in batch]) == [True] * len(batch)
    before = stats(node)
    spilled = on_disk(tmp_path / "disk")
    assert before["disk_items"] == len(spilled) >= 250  # most chunks went down to disk
    assert before["disk_write_errors"] == 0 and before["disk_corrupt_dropped"] == 0

    node.restart()  # SIGKILL: nothing flushed, no goodbye

    after = stats(node)
    assert after["disk_items"] == len(spilled) and after["items"] == 0
    expected = [key for key in keys if key.hex() in spilled]
    with ClusterClient([node.member]) as client:
        got = client.get(expected)
        assert client.stats.checksum_mismatches == 0
    served = 0
    for key, value in zip(expected, got):
        if value is not None:
            assert bytes(value) == payload(key)
            served += 1
    fraction = served / len(expected)
    print(f"served again after restart: {served}/{len(expected)} = {fraction:.4f}")
    assert fraction >= 0.99
    assert stats(node)["disk_hits"] == served


def test_no_corrupted_value_is_ever_served_across_random_kills(disk_node, tmp_path):
    """A client writes without pause into a node whose memory holds two or three values, so
    nearly every PUT spills a record to disk; once 1 MiB is acknowledged (so records are being
    written), the node is SIGKILLed after a random delay, KILLS times, and restarted on the same
    directory. After each restart, everything written in the cycle just cut short and a sample of
    older keys is read back: misses are allowed, wrong bytes never (compared byte for byte, and
    the client saw no checksum mismatch either)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rng = random.Random(seed)
    directory = tmp_path / "disk"
    node = disk_node(512 * KiB, 32 * MiB)
    # A PUT cut off by the kill costs one timeout per cycle: keep it short.
    config = ClientConfig(timeout_s=0.15, down_backoff_s=0.0)
    written: list[bytes] = []
    counts = {"served": 0, "missed": 0, "records_written": 0, "torn_writes_left": 0}
    started = time.monotonic()
    for cycle in range(KILLS):
        before = on_disk(directory)
        cycle_keys: list[bytes] = []
        acknowledged = 0
        killer: threading.Timer | None = None
        killed = threading.Event()
        with ClusterClient([node.member], config) as client:
            while not killed.is_set():
                keys = make_keys(8, f"crash-{seed}-{cycle}-{len(cycle_keys)}")
                values = [payload(key) for key in keys]
                stored = client.put(keys, values)
                cycle_keys += keys
                acknowledged += sum(len(value) for value, ok in zip(values, stored) if ok)
                if killer is None and acknowledged >= MiB:
                    killer, killed = kill_after(node, rng.uniform(0.0, 0.5))
        assert killer is not None
        killer.join()
        node.process.wait()
        counts["torn_writes_left"] += len(on_disk(directory, ".tmp"))
        new_records = on_disk(directory) - before
        assert new_records, f"cycle {cycle}: no record reached the disk before the kill"
        counts["records_written"] += len(new_records)

        node.start()
        node.wait_ready()
        assert on_disk(directory, ".tmp") == set()  # the restart removed every torn write
        sample = cycle_keys + rng.sample(written, min(len(written), 32))
        written += cycle_keys
        with ClusterClient([node.member], config) as client:
            got = client.get(sample)
            assert client.stats.checksum_mismatches == 0
        for key, value in zip(sample, got):
            if value is None:
                counts["missed"] += 1
            else:
                assert bytes(value) == payload(key), f"cycle {cycle}: wrong bytes served"
                counts["served"] += 1
    elapsed = time.monotonic() - started
    print(f"{KILLS} kills in {elapsed:.1f} s, {len(written)} keys written: {counts}")
    assert counts["served"] > 0


def test_a_kill_in_the_middle_of_a_record_write_leaves_a_temp_file_the_restart_removes(
    disk_node, tmp_path
):
    """Deterministically mid-write: a 64 MiB value (too large for memory, so written straight to
    disk) is PUT from a thread while this thread watches for its temp file and kills the node the
    moment it holds bytes, before the record is complete."""
    directory = tmp_path / "disk"
    node = disk_node(1 * MiB, 256 * MiB)
    settled = make_keys(10, "settled")
    with ClusterClient([node.member]) as client:
        assert client.put(settled, [payload(key) for key in settled]) == [True] * len(settled)
    (large,) = make_keys(1, "large")
    temp = directory / large.hex()[:2] / f"{large.hex()}.tmp"
    record_bytes = 64 * MiB

    def put_large() -> None:
        with ClusterClient([node.member], ClientConfig(timeout_s=1.0)) as client:
            client.put([large], [payload(large, record_bytes)])

    writer = threading.Thread(target=put_large)
    writer.start()
    deadline = time.monotonic() + 20.0
    while not (temp.exists() and temp.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.001)  # writing 64 MiB takes tens of milliseconds: a wide window
    node.kill()
    writer.join()
    assert temp.exists() and 0 < temp.stat().st_size < record_bytes, "the write was not cut"
    assert large.hex() not in on_disk(directory)  # never renamed: never a record

    node.start()
    node.wait_ready()
    assert not temp.exists()
    with ClusterClient([node.member]) as client:
        got = client.get([large, *settled])
        assert client.stats.checksum_mismatches == 0
    assert got[0] is None
    spilled = [(key, value) for key, value in zip(settled, got[1:]) if value is not None]
    assert spilled and all(bytes(value) == payload(key) for key, value in spilled)


def test_a_damaged_record_is_a_miss_over_the_wire_and_shows_in_stats_and_metrics(
    disk_node, tmp_path
):
    node = disk_node(1 * MiB, 64 * MiB)
    keys = make_keys(20, "wire")
    with ClusterClient([node.member]) as client:
        assert client.put(keys, [payload(key) for key in keys]) == [True] * len(keys)
        spilled = [key for key in keys if key.hex() in on_disk(tmp_path / "disk")]
        damaged, intact = spilled[:2]
        path = tmp_path / "disk" / damaged.hex()[:2] / f"{damaged.hex()}.kv"
        data = bytearray(path.read_bytes())
        data[-100] ^= 0x04
        path.write_bytes(bytes(data))
        got = client.get([damaged, intact])
        assert got[0] is None and bytes(got[1]) == payload(intact)
        assert client.stats.checksum_mismatches == 0  # the node never sent the bad bytes
        assert client.contains([damaged]) == [False]
    figures = stats(node)
    assert figures["disk_corrupt_dropped"] == 1 and not path.exists()
    assert figures["disk_hits"] == figures["disk_promotions"] == 1
    assert figures["disk_items"] == len(on_disk(tmp_path / "disk"))
    assert figures["disk_spills"] >= len(spilled)  # and what the promotion pushed down
    assert figures["disk_budget_bytes"] == 64 * MiB
    assert 0 < figures["disk_used_bytes"] <= 64 * MiB
    assert metrics(node) == {
        "kvcache_node_disk_items": figures["disk_items"],
        "kvcache_node_disk_used_bytes": figures["disk_used_bytes"],
        "kvcache_node_disk_budget_bytes": 64 * MiB,
        "kvcache_node_disk_spills_total": figures["disk_spills"],
        "kvcache_node_disk_hits_total": 1,
        "kvcache_node_disk_promotions_total": 1,
        "kvcache_node_disk_evictions_total": 0,
        "kvcache_node_disk_write_errors_total": 0,
        "kvcache_node_disk_corrupt_dropped_total": 1,
        "kvcache_node_disk_rejected_total": 0,
    }


def run_node_command(*flags: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kvcache", "node", "--node-id", "refused"]
    ports = ("--port", str(free_port()), "--admin-port", str(free_port()))
    return subprocess.run(
        [*command, *ports, *flags],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_a_disk_directory_without_a_budget_is_refused(tmp_path):
    result = run_node_command("--disk-dir", str(tmp_path / "disk"))
    assert result.returncode != 0 and "--disk" in result.stderr


def test_a_second_node_on_a_directory_in_use_is_refused(disk_node, tmp_path):
    disk_node(1 * MiB, 16 * MiB)
    result = run_node_command("--disk-dir", str(tmp_path / "disk"), "--disk", "16Mi")
    assert result.returncode != 0 and "in use" in result.stderr
