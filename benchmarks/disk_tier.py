"""What spilling to the disk tier costs a PUT: throughput with and without spills, in one run.

    python benchmarks/disk_tier.py [--seconds 3] [--repeats 3] [--dir DIR] [--out FILE.json]

Three node processes run side by side: `memory` (1 GiB, evicting without a disk tier), `spill`
(64 MiB of memory over a 512 MiB disk tier in DIR, default a temporary directory) and `encrypted`
(the same with an at-rest key). Every timed call PUTs 128 MiB of fresh keys through
`ClusterClient`, so on the disk nodes each PUT evicts about its own size from memory, and the disk
tier writes it and, once full (after the untimed warm-up), evicts and unlinks an older record. The
steady state matters: in a fresh VM the first write into never-touched page cache memory costs
several times more (measured 5-11 ms per 2 MiB here, against 0.6-0.8 ms for reused pages).
Disk writes run synchronously on the node's event loop, so this is the whole cost a client sees.
It also times PUTs and disk-hit GETs through the request handler alone, in this process.
Figures are medians of `repeats`; they include the page cache and the kernel's writeback, not
fsync (the tier does none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import zmq

from kvcache.cachenode.at_rest import AtRestCipher
from kvcache.cachenode.disk_tier import DiskTier
from kvcache.cachenode.handler import RequestHandler
from kvcache.cachenode.launcher import LocalCluster, NodeProcess, free_port
from kvcache.cachenode.memory_tier import MemoryTier
from kvcache.cachenode.stats import NodeStats
from kvcache.cachenode.tiered_store import TieredStore
from kvcache.client.cluster import ClusterClient
from kvcache.core.allocator import retain_freed_buffers
from kvcache.core.checksum import checksum
from kvcache.core.protocol import Op, Request, ValueInfo

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZES = [256 * KiB, 2 * MiB]
CALL_BYTES = 128 * MiB
MODES = ["memory", "spill", "encrypted"]
DISK_BYTES = 512 * MiB


def start_nodes(directory: Path) -> dict[str, NodeProcess]:
    key_file = directory / "at-rest.key"
    key_file.write_text(os.urandom(32).hex())
    disk = ("--disk", str(DISK_BYTES))
    nodes = {
        "memory": NodeProcess("memory", free_port(), free_port(), 1 * GiB),
        "spill": NodeProcess(
            "spill", free_port(), free_port(), 64 * MiB, (*disk, "--disk-dir", str(directory / "p"))
        ),
        "encrypted": NodeProcess(
            "encrypted",
            free_port(),
            free_port(),
            64 * MiB,
            (*disk, "--disk-dir", str(directory / "e"), "--at-rest-key-file", str(key_file)),
        ),
    }
    LocalCluster.launch(list(nodes.values()))
    return nodes


def measure_puts(client: ClusterClient, value_bytes: int, seconds: float) -> float:
    """Payload GB/s of 128 MiB PUT calls of fresh keys for `seconds`, after untimed calls that
    fill a disk tier's budget."""
    count = CALL_BYTES // value_bytes
    values = [os.urandom(value_bytes)] * count
    calls = 0

    def one_call() -> int:
        nonlocal calls
        calls += 1
        keys = [f"{value_bytes}-{calls}-{i}".encode().ljust(32, b"-") for i in range(count)]
        return value_bytes * sum(client.put(keys, values))

    for _ in range(DISK_BYTES // CALL_BYTES + 1):
        one_call()
    moved, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        moved += one_call()
    return moved / (time.perf_counter() - started) / 1e9


def measure_handler(directory: Path, mode: str, value_bytes: int, seconds: float) -> dict:
    """Microseconds per PUT and per GET through the node's request handler in this process, no
    sockets: the time one request holds the event loop. PUTs are of fresh keys into 64 MiB of
    memory (over a 256 MiB disk tier unless `mode` is "memory"); GETs read keys on disk only, so
    each is a disk hit that is promoted and pushes a value down."""
    value = os.urandom(value_bytes)
    info = ValueInfo(value_bytes, 1, checksum([value]))
    cipher = AtRestCipher(os.urandom(32)) if mode == "encrypted" else None
    disk = None if mode == "memory" else DiskTier(directory, 256 * MiB, cipher=cipher)
    handler = RequestHandler("bench", TieredStore(MemoryTier(64 * MiB), disk), NodeStats())
    keys: list[bytes] = []

    def request(op: Op, key: bytes) -> None:
        if op is Op.PUT:
            handler.handle([Request(op, len(keys), [key], [info]).encode(), zmq.Frame(value)])
        else:
            handler.handle([Request(op, len(keys), [key]).encode()])

    try:
        for _ in range(320 * MiB // value_bytes):  # untimed: both tiers full, pages reused
            keys.append(len(keys).to_bytes(32, "big"))
            request(Op.PUT, keys[-1])
        timed, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            keys.append(len(keys).to_bytes(32, "big"))
            request(Op.PUT, keys[-1])
            timed += 1
        put_us = (time.perf_counter() - started) / timed * 1e6
        if disk is None:
            return {"put_us": round(put_us)}
        on_disk = [key for key in keys if key in disk and key not in handler.store.memory]
        reads = on_disk[-64 * MiB // value_bytes :]  # the newest: the spills evict the oldest
        started = time.perf_counter()
        for key in reads:
            request(Op.GET, key)
        get_us = (time.perf_counter() - started) / len(reads) * 1e6
        assert disk.hits == len(reads)
        return {"put_us": round(put_us), "get_us": round(get_us)}
    finally:
        if disk is not None:
            disk.close()


def _label(size: int) -> str:
    return f"{size // KiB} KiB" if size < MiB else f"{size // MiB} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dir", default=None, help="where the disk tiers live (default: a temp dir)"
    )
    parser.add_argument("--out", default="benchmarks/results/disk_tier.json")
    args = parser.parse_args()

    retain_freed_buffers(4 * MiB, 1 * GiB)  # as a node does
    records = []
    with tempfile.TemporaryDirectory(prefix="kvcache-bench-disk-", dir=args.dir) as temp:
        directory = Path(temp)
        for size in SIZES:
            for mode in MODES:
                figures = measure_handler(directory / f"handler-{mode}", mode, size, args.seconds)
                records.append({"mode": mode, "op": "handler", "value_bytes": size, **figures})
                get = f", GET from disk {figures['get_us']} us" if "get_us" in figures else ""
                print(f"handler {_label(size):>7s} {mode:9s}: PUT {figures['put_us']} us{get}")
        nodes = start_nodes(directory)
        clients = {mode: ClusterClient([nodes[mode].member]) for mode in MODES}
        try:
            for size in SIZES:
                runs: dict[str, list[float]] = {mode: [] for mode in MODES}
                for _ in range(args.repeats):
                    for mode in MODES:  # back to back, so load on the machine hits all alike
                        runs[mode].append(measure_puts(clients[mode], size, args.seconds))
                for mode, figures in runs.items():
                    gbps = statistics.median(figures)
                    per_value_us = size / (gbps * 1e9) * 1e6
                    records.append({"mode": mode, "op": "put", "value_bytes": size,
                                    "gbps": round(gbps, 3), "us_per_value": round(per_value_us),
                                    "runs": [round(f, 3) for f in figures]})  # fmt: skip
                    each = ", ".join(f"{figure:.2f}" for figure in figures)
                    print(f"PUT {_label(size):>7s} {mode:9s}: {gbps:.2f} GB/s, "
                          f"{per_value_us:.0f} us/value (runs: {each})", flush=True)  # fmt: skip
        finally:
            for client in clients.values():
                client.close()
            for node in nodes.values():
                node.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
