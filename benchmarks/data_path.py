"""Data-path throughput: kvcache nodes vs Redis vs the loopback ceiling, measured in one run.

    python benchmarks/data_path.py [--nodes 3] [--seconds 2] [--repeats 3] [--out FILE.json]

For each value size (256 KiB, 2 MiB, 32 MiB) and 1 and 4 concurrent client processes it measures
PUT and GET throughput in GB/s of payload:
- kvcache: acknowledged PUTs and checksum-verified GETs through `ClusterClient`, batched calls;
- Redis (Debian's redis-server, persistence off) through redis-py + hiredis, one SET / GET per
  value, the way LMCache's `redis://` backend uses it;
- the loopback ceiling: one process `sendall`s 32 MiB buffers, another `recv_into`s a reused one.
Both stores are written once before a PUT is timed, so timed PUTs overwrite: the steady state of a
full cache, where memory is recycled rather than faulted in. It also times `lookup_prefix` of 512
keys over the nodes. Each figure is the median of several runs taken back to back with the peer's;
the ceiling is the median of one measurement before each size and one at the end. Prints a table
and writes the records read back by docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kvcache.cachenode.launcher import LocalCluster, free_port
from kvcache.client.cluster import ClusterClient
from kvcache.core.keys import Namespace, chunk_keys
from kvcache.core.ring import Member

KiB, MiB = 1 << 10, 1 << 20
SIZES = [256 * KiB, 2 * MiB, 32 * MiB]
CLIENTS = [1, 4]
WORKING_SET_BYTES = 256 * MiB  # per client
CALL_BYTES = 256 * MiB  # per kvcache put/get call: a 2K-token prefix of Llama-3-8B (fp16)
CEILING_BYTES = 32 * MiB


@dataclass(frozen=True)
class Job:
    system: str  # "kvcache" | "redis"
    op: str  # "put" | "get"
    value_bytes: int
    client_index: int
    seconds: float
    members: tuple[Member, ...] = ()
    redis_port: int = 0


def _keys(job: Job) -> list[bytes]:
    count = max(4, WORKING_SET_BYTES // job.value_bytes)
    return [
        f"{job.client_index:02d}-{job.value_bytes:09d}-{i:06d}".encode().ljust(32, b"-")
        for i in range(count)
    ]


def _batches(keys: list[bytes], value_bytes: int) -> list[list[bytes]]:
    per_call = max(1, CALL_BYTES // value_bytes)
    return [keys[i : i + per_call] for i in range(0, len(keys), per_call)]


def _timed_passes(one_pass, seconds: float, ready, go) -> tuple[int, float, float]:
    """After one untimed pass (buffers warm on both sides), repeat `one_pass` (which returns the
    payload bytes it moved) for `seconds` once every client is ready."""
    one_pass()
    ready.wait()
    go.wait()
    moved, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        moved += one_pass()
    return moved, started, time.perf_counter()


def _run_kvcache(job: Job, value: bytes, keys: list[bytes], ready, go) -> tuple[int, float, float]:
    with ClusterClient(list(job.members)) as client:
        batches = _batches(keys, job.value_bytes)
        for batch in batches:  # fill the store: timed PUTs overwrite, timed GETs hit
            assert all(client.put(batch, [value] * len(batch)))

        def one_pass() -> int:
            if job.op == "put":
                stored = (client.put(batch, [value] * len(batch)) for batch in batches)
                return job.value_bytes * sum(sum(flags) for flags in stored)
            found = (client.get(batch) for batch in batches)
            return sum(len(v) for values in found for v in values if v is not None)

        return _timed_passes(one_pass, job.seconds, ready, go)


def _run_redis(job: Job, value: bytes, keys: list[bytes], ready, go) -> tuple[int, float, float]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=job.redis_port)
    for key in keys:
        client.set(key, value)

    def one_pass() -> int:
        if job.op == "put":
            for key in keys:
                client.set(key, value)
            return job.value_bytes * len(keys)
        return sum(len(client.get(key)) for key in keys)

    try:
        return _timed_passes(one_pass, job.seconds, ready, go)
    finally:
        client.close()


def _client_process(job: Job, ready, go, results) -> None:
    value = os.urandom(job.value_bytes)
    keys = _keys(job)
    run = _run_kvcache if job.system == "kvcache" else _run_redis
    results.put(run(job, value, keys, ready, go))


def measure(jobs: list[Job]) -> float:
    """Run one client process per job at once; aggregate payload GB/s over the common window."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(len(jobs) + 1)
    go = context.Barrier(len(jobs) + 1)
    results = context.Queue()
    processes = [context.Process(target=_client_process, args=(job, ready, go, results))
                 for job in jobs]  # fmt: skip
    for process in processes:
        process.start()
    ready.wait()
    go.wait()
    outcomes = [results.get() for _ in processes]
    for process in processes:
        process.join()
    moved = sum(outcome[0] for outcome in outcomes)
    window = max(o[2] for o in outcomes) - min(o[1] for o in outcomes)
    return moved / window / 1e9


def _ceiling_receiver(port: int, total: int, ready) -> None:
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(1)
        ready.set()
        connection, _ = server.accept()
        buffer = memoryview(bytearray(CEILING_BYTES))
        received = 0
        while received < total:
            count = connection.recv_into(buffer, CEILING_BYTES)
            if count == 0:
                break
            received += count
        connection.sendall(b"k")
        connection.close()


def measure_ceiling(seconds: float) -> float:
    """Loopback TCP with a raw socket: one process sendall()s, another recv_into()s."""
    total = int(seconds * 4e9) // CEILING_BYTES * CEILING_BYTES
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    port = free_port()
    receiver = context.Process(target=_ceiling_receiver, args=(port, total, ready))
    receiver.start()
    ready.wait()
    data = os.urandom(CEILING_BYTES)
    with socket.create_connection(("127.0.0.1", port)) as sender:
        sender.sendall(data)  # warm the connection's buffers
        started = time.perf_counter()
        for _ in range(total // CEILING_BYTES - 1):
            sender.sendall(data)
        sender.recv(1)
        elapsed = time.perf_counter() - started
    receiver.join()
    return (total - CEILING_BYTES) / elapsed / 1e9


def measure_lookup(members: list[Member], repeats: int = 2000) -> tuple[float, float]:
    """p50 / p99 ms of lookup_prefix over a 512-key chain whose first 300 keys are cached."""
    keys = chunk_keys(list(range(512 * 16)), Namespace(model="bench"), chunk_tokens=16)
    with ClusterClient(members) as client:
        client.put(keys[:300], [b"v" * 64] * 300)
        assert client.lookup_prefix(keys) == 300
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            client.lookup_prefix(keys)
            timings.append((time.perf_counter() - started) * 1000)
    quantiles = statistics.quantiles(timings, n=100)
    return statistics.median(timings), quantiles[98]


class RedisServer:
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found: run scripts/system-deps")
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="kvcache-bench-redis-")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory, "--proto-max-bulk-len", "512mb"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def measure_throughput(
    members: list[Member], redis_port: int, seconds: float, repeats: int
) -> tuple[list[dict], list[float]]:
    """Every (size, clients, op) figure for both systems, each the median of `repeats` runs
    taken back to back with the peer's, and a loopback ceiling before each size."""
    records, ceilings = [], []
    for size in SIZES:
        ceilings.append(measure_ceiling(seconds))
        print(f"loopback ceiling: {ceilings[-1]:.2f} GB/s", flush=True)
        for clients in CLIENTS:
            for op in ("put", "get"):
                runs: dict[str, list[float]] = {"kvcache": [], "redis": []}
                for _ in range(repeats):
                    for system, figures in runs.items():
                        jobs = [
                            Job(system, op, size, index, seconds, tuple(members), redis_port)
                            for index in range(clients)
                        ]
                        figures.append(measure(jobs))
                for system, figures in runs.items():
                    gbps = statistics.median(figures)
                    records.append({"system": system, "op": op, "value_bytes": size,
                                    "clients": clients, "gbps": round(gbps, 3)})  # fmt: skip
                    each = ", ".join(f"{figure:.2f}" for figure in figures)
                    label = f"{system:8s} {op:3s} {_size_label(size):>7s} x{clients}"
                    print(f"{label}: {gbps:.2f} GB/s  (runs: {each})", flush=True)
    return records, ceilings


def _size_label(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure (median taken)")
    parser.add_argument("--out", default="benchmarks/results/data_path.json")
    args = parser.parse_args()

    redis_server = RedisServer()
    memory = 4 * WORKING_SET_BYTES * max(CLIENTS) // args.nodes + 256 * MiB
    try:
        with LocalCluster.start(args.nodes, memory) as cluster:
            p50, p99 = measure_lookup(cluster.members)
            print(f"lookup_prefix 512 keys, {args.nodes} nodes: p50 {p50:.3f} ms, p99 {p99:.3f} ms")
            records, ceilings = measure_throughput(
                cluster.members, redis_server.port, args.seconds, args.repeats
            )
    finally:
        redis_server.stop()
    ceilings.append(measure_ceiling(args.seconds))
    ceiling = statistics.median(ceilings)
    print(f"loopback ceilings: {', '.join(f'{c:.2f}' for c in ceilings)}; median {ceiling:.2f}")
    records.insert(0, {"system": "loopback", "op": "put", "value_bytes": CEILING_BYTES,
                       "clients": 1, "gbps": round(ceiling, 3)})  # fmt: skip
    records.append({"system": "kvcache", "op": "lookup_prefix", "keys": 512,
                    "p50_ms": round(p50, 4), "p99_ms": round(p99, 4)})  # fmt: skip
    print_table(records, ceiling)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(f"\nwrote {out}")


def print_table(records: list[dict], ceiling: float) -> None:
    figures = {(r["system"], r["op"], r["value_bytes"], r["clients"]): r["gbps"]
               for r in records if "gbps" in r}  # fmt: skip
    print(f"\n{'size':>7s} {'clients':>7s} {'op':>3s} {'kvcache':>8s} {'redis':>7s} "
          f"{'kv/redis':>8s} {'kv/ceiling':>10s}")  # fmt: skip
    for size in SIZES:
        for clients in CLIENTS:
            for op in ("put", "get"):
                ours = figures[("kvcache", op, size, clients)]
                theirs = figures[("redis", op, size, clients)]
                print(f"{_size_label(size):>7s} {clients:>7d} {op:>3s} {ours:8.2f} {theirs:7.2f} "
                      f"{ours / theirs:8.2f} {ours / ceiling:10.0%}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
