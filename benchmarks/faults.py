"""Fault injection: SIGKILL one of three replicated nodes under load, then restart it from its disk.

    python benchmarks/faults.py [--lease-ttl 5] [--before 4] [--outage 9] [--after 5] [--out FILE]

A real etcd and 3 real node processes (small memory tier, larger disk tier, etcd leases of
`--lease-ttl` s); one client with R=2 whose ring follows etcd writes new chunks and reads back
earlier ones without pause, checking every byte against what it wrote. After `--before` seconds
one node is SIGKILLed; `--outage` seconds later it is restarted on the same ports and the same
disk directory; the load runs `--after` seconds more. Reported:
- client_errors: exceptions out of the client (must be 0); wrong_bytes: values served that differ
  from what was written (must be 0); misses while the node was down, and chunks written before the
  kill that no reader could get at the end of the outage (must be 0 with R=2);
- ring_drop_s: from the kill until the client's ring no longer has the node (bound: TTL + 1 s);
  ring_rejoin_s: from the restart command until the ring has it again (includes process start);
- restart_served_fraction: of the chunks that were in the killed node's disk tier when it died,
  the fraction the restarted node itself serves again with the right bytes.
Prints a table and writes `benchmarks/results/faults.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvcache.cachenode.disk_tier import DiskTier
from kvcache.cachenode.launcher import LocalCluster, NodeProcess
from kvcache.client.cluster import ClusterClient
from kvcache.client.membership import EtcdMembership
from kvcache.core.config import ClientConfig, EtcdConfig
from kvcache.core.membership import RingView
from kvcache.local_etcd import LocalEtcd

CLUSTER = "faults"
CHUNK_BYTES = 256 << 10
WRITES_PER_STEP = 8
READS_PER_STEP = 24


def chunk_value(key: bytes) -> bytes:
    """The bytes written under `key`, derived from it so any reader can check them."""
    return hashlib.shake_128(key).digest(CHUNK_BYTES)


def chunk_key(index: int) -> bytes:
    return hashlib.blake2b(f"faults-{index}".encode(), digest_size=32).digest()


@dataclass
class Phase:
    reads: int = 0
    misses: int = 0
    writes: int = 0
    writes_refused: int = 0


@dataclass
class Results:
    client_errors: int = 0
    wrong_bytes: int = 0
    ring_drop_s: float = float("nan")
    ring_rejoin_s: float = float("nan")
    restart_served_fraction: float = float("nan")
    lease_ttl_s: float = 0.0
    lost_written_before_kill: int = 0
    written_before_kill: int = 0
    disk_chunks_at_kill: int = 0
    phases: dict[str, Phase] = field(default_factory=dict)


class RingWatch:
    """Records when the client's ring view stops and starts containing a node."""

    def __init__(self, membership: EtcdMembership) -> None:
        self.changes: list[tuple[float, frozenset[str]]] = []
        self._lock = threading.Lock()
        membership.subscribe(self._changed)

    def _changed(self, view: RingView) -> None:
        with self._lock:
            self.changes.append((time.monotonic(), view.node_ids))

    def first(self, since: float, present: bool, node_id: str) -> float | None:
        with self._lock:
            for at, node_ids in self.changes:
                if at >= since and (node_id in node_ids) == present:
                    return at
        return None


class Workload:
    def __init__(self, client: ClusterClient, results: Results) -> None:
        self.client = client
        self.results = results
        self.written: list[bytes] = []
        self._next = 0
        self._random = random.Random(11)

    def step(self, phase: Phase) -> None:
        keys = [chunk_key(self._next + i) for i in range(WRITES_PER_STEP)]
        self._next += WRITES_PER_STEP
        try:
            stored = self.client.put(keys, [chunk_value(k) for k in keys])
            phase.writes += len(keys)
            phase.writes_refused += stored.count(False)
            self.written.extend(k for k, ok in zip(keys, stored) if ok)
            sample = self._random.sample(self.written, min(READS_PER_STEP, len(self.written)))
            self.check(sample, phase)
        except Exception as error:  # the count that must stay 0; keep going to see the rest
            self.results.client_errors += 1
            print(f"client error: {error!r}")

    def check(self, keys: list[bytes], phase: Phase) -> int:
        """GET `keys`, count misses and wrong bytes into `phase`; returns how many missed."""
        missed = 0
        for key, value in zip(keys, self.client.get(keys)):
            phase.reads += 1
            if value is None:
                missed += 1
            elif bytes(value) != chunk_value(key):
                self.results.wrong_bytes += 1
        phase.misses += missed
        return missed

    def run_for(self, seconds: float, phase: Phase) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.step(phase)


def disk_keys(directory: Path, candidates: list[bytes]) -> list[bytes]:
    """Which of `candidates` a dead node's disk tier holds, read with the node's own index
    rebuild (the tier is closed again before the node restarts on the directory)."""
    tier = DiskTier(directory, budget_bytes=1 << 40)
    try:
        return [key for key in candidates if key in tier]
    finally:
        tier.close()


def served_by(node: NodeProcess, keys: list[bytes]) -> int:
    """How many of `keys` the node itself serves with the right bytes (no other replica)."""
    with ClusterClient([node.member], ClientConfig(timeout_s=5.0)) as client:
        served = 0
        for start in range(0, len(keys), 256):
            batch = keys[start : start + 256]
            for key, value in zip(batch, client.get(batch)):
                served += value is not None and bytes(value) == chunk_value(key)
        return served


def run(lease_ttl_s: int, before_s: float, outage_s: float, after_s: float) -> Results:
    results = Results(lease_ttl_s=float(lease_ttl_s))
    data = Path(tempfile.mkdtemp(prefix="kvcache-faults-"))
    with LocalEtcd.start() as etcd:
        node_args = [
            "--etcd", etcd.endpoint, "--cluster", CLUSTER, "--lease-ttl", str(lease_ttl_s),
            "--disk", "1Gi",
        ]  # fmt: skip

        def per_node(index: int) -> list[str]:
            return [*node_args, "--disk-dir", str(data / f"node-{index}")]

        with LocalCluster.start(3, 32 << 20, extra_args=per_node) as cluster:
            membership = EtcdMembership(EtcdConfig(etcd.endpoint, CLUSTER))
            watch = RingWatch(membership)
            ids = {node.node_id for node in cluster.nodes}
            membership.wait_for(lambda view: view.node_ids == ids, 10)
            config = ClientConfig(replicas=2, timeout_s=0.5, down_backoff_s=1.0)
            with ClusterClient(membership, config, owns_membership=True) as client:
                workload = Workload(client, results)
                for name in ["before", "outage", "after"]:
                    results.phases[name] = Phase()
                workload.run_for(before_s, results.phases["before"])

                victim = cluster.nodes[1]
                written_before = list(workload.written)
                killed_at = time.monotonic()
                victim.kill()
                workload.run_for(outage_s, results.phases["outage"])
                dropped = watch.first(killed_at, False, victim.node_id)
                results.ring_drop_s = dropped - killed_at if dropped else float("inf")

                results.written_before_kill = len(written_before)
                end_of_outage = Phase()
                results.lost_written_before_kill = sum(
                    workload.check(written_before[i : i + 256], end_of_outage)
                    for i in range(0, len(written_before), 256)
                )

                on_disk = disk_keys(data / "node-1", workload.written)
                results.disk_chunks_at_kill = len(on_disk)
                restarted_at = time.monotonic()
                victim.start()
                victim.wait_ready()
                workload.run_for(after_s, results.phases["after"])
                rejoined = watch.first(restarted_at, True, victim.node_id)
                results.ring_rejoin_s = rejoined - restarted_at if rejoined else float("inf")
                if on_disk:
                    results.restart_served_fraction = served_by(victim, on_disk) / len(on_disk)
    return results


def print_table(results: Results) -> None:
    rows = [
        ("client errors", results.client_errors, "0"),
        ("wrong bytes served", results.wrong_bytes, "0"),
        ("ring drop after SIGKILL (s)", f"{results.ring_drop_s:.2f}",
         f"<= lease TTL + 1 = {results.lease_ttl_s + 1:.0f}"),
        ("ring rejoin after restart (s)", f"{results.ring_rejoin_s:.2f}", ""),
        ("chunks written before the kill", results.written_before_kill, ""),
        ("... not readable at end of outage", results.lost_written_before_kill, "0"),
        ("chunks on the killed node's disk", results.disk_chunks_at_kill, ""),
        ("... served again after restart", f"{results.restart_served_fraction:.4f}", ">= 0.99"),
    ]  # fmt: skip
    for name, phase in results.phases.items():
        rows.append((f"{name}: reads / misses", f"{phase.reads} / {phase.misses}", ""))
        rows.append((f"{name}: writes / refused", f"{phase.writes} / {phase.writes_refused}", ""))
    width = max(len(name) for name, _, _ in rows)
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {str(value).rjust(14)}  {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease-ttl", type=int, default=5, help="the nodes' default")
    parser.add_argument("--before", type=float, default=4.0)
    parser.add_argument("--outage", type=float, default=9.0)
    parser.add_argument("--after", type=float, default=5.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "faults.json"))
    args = parser.parse_args()
    results = run(args.lease_ttl, args.before, args.outage, args.after)
    print_table(results)
    record = asdict(results)
    record["command"] = "python benchmarks/faults.py " + " ".join(
        f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items() if name != "out"
    )
    record["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
