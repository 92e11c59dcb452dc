"""`kvcache up`: a local cluster of cache node processes and a short workload against it.

With `--etcd` it also starts a local etcd server: the nodes register there under leases and the
client builds its ring from what it watches, as in production; without it, the client is given the
static member list.

The workload is the cache's everyday job in miniature: prompts that share a system prompt and
differ in their tails are cut into chunk keys; each request looks up its longest cached prefix,
loads those chunks (checking every byte against what was stored), and stores the rest. The first
round finds only the shared prefix; the second finds everything.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass, field

from kvcache.cachenode.launcher import LocalCluster
from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig, EtcdConfig
from kvcache.core.keys import Namespace, chunk_keys
from kvcache.local_etcd import LocalEtcd

CLUSTER_NAME = "local"

CHUNK_TOKENS = 256
# One 256-token chunk of SmolLM2-135M's KV in fp16: 30 layers x (K, V) x 256 x 3 heads x 64 x 2 B.
CHUNK_BYTES = 30 * 2 * CHUNK_TOKENS * 3 * 64 * 2
SYSTEM_PROMPT_TOKENS = 512
TAIL_TOKENS = 1024


@dataclass
class RoundTally:
    name: str
    chunks: int = 0
    hit_chunks: int = 0
    wrong_bytes: int = 0
    put_bytes: int = 0
    get_bytes: int = 0
    put_s: float = 0.0
    get_s: float = 0.0
    lookup_ms: list[float] = field(default_factory=list)

    def row(self) -> list[str]:
        def rate(nbytes: int, seconds: float) -> str:
            return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 and nbytes else "-"

        return [
            self.name,
            str(self.chunks),
            f"{self.hit_chunks} ({100 * self.hit_chunks / max(self.chunks, 1):.0f}%)",
            str(self.hit_chunks * CHUNK_TOKENS),
            f"{self.put_bytes / 2**20:.0f}",
            rate(self.put_bytes, self.put_s),
            f"{self.get_bytes / 2**20:.0f}",
            rate(self.get_bytes, self.get_s),
            f"{statistics.median(self.lookup_ms):.2f}" if self.lookup_ms else "-",
            str(self.wrong_bytes),
        ]


def _chunk_value(key: bytes) -> bytes:
    """Stand-in KV bytes for a chunk, fixed by its key so a reload can be checked."""
    return random.Random(key).randbytes(CHUNK_BYTES)


def _prompts(count: int, seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(49152) for _ in range(SYSTEM_PROMPT_TOKENS)]
    return [system + [rng.randrange(49152) for _ in range(TAIL_TOKENS)] for _ in range(count)]


def _run_round(
    name: str, client: ClusterClient, prompts: list[list[int]], namespace: Namespace,
    stored: dict[bytes, bytes],
) -> RoundTally:  # fmt: skip
    tally = RoundTally(name)
    for tokens in prompts:
        keys = chunk_keys(tokens, namespace, CHUNK_TOKENS)
        tally.chunks += len(keys)
        started = time.perf_counter()
        hit = client.lookup_prefix(keys)
        tally.lookup_ms.append((time.perf_counter() - started) * 1000)
        if hit:
            started = time.perf_counter()
            values = client.get(keys[:hit])
            tally.get_s += time.perf_counter() - started
            for key, value in zip(keys, values):
                if value is None:
                    continue
                tally.hit_chunks += 1
                tally.get_bytes += len(value)
                tally.wrong_bytes += bytes(value) != stored[key]
        missing = keys[hit:]
        if missing:
            payloads = [stored.setdefault(k, _chunk_value(k)) for k in missing]
            started = time.perf_counter()
            client.put(missing, payloads, [{"depth": hit + i} for i in range(len(missing))])
            tally.put_s += time.perf_counter() - started
            tally.put_bytes += sum(len(p) for p in payloads)
    return tally


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def _client(cluster: LocalCluster, etcd: LocalEtcd | None, replicas: int) -> ClusterClient:
    config = ClientConfig(replicas=replicas)
    if etcd is None:
        return ClusterClient(cluster.members, config)
    client = ClusterClient.from_etcd(EtcdConfig(etcd.endpoint, CLUSTER_NAME), config)
    deadline = time.monotonic() + 10
    while len(client.ring) < len(cluster.nodes) and time.monotonic() < deadline:
        client.ping()  # picks up the newest ring
        time.sleep(0.05)
    print(
        f"ring from etcd: {len(client.ring)} members at epoch {client.epoch}, "
        f"{replicas} replica(s) per chunk"
    )
    return client


def run_local_demo(
    nodes: int, memory_bytes: int, prompts: int, with_etcd: bool = False, replicas: int = 1
) -> None:
    with contextlib.ExitStack() as stack:
        etcd = None
        node_args: list[str] = []
        if with_etcd:
            etcd = stack.enter_context(LocalEtcd.start())
            node_args = ["--etcd", etcd.endpoint, "--cluster", CLUSTER_NAME]
            print(f"etcd at {etcd.endpoint}; members under /kvcache/{CLUSTER_NAME}/members/")
        print(f"starting {nodes} cache nodes ({memory_bytes / 2**30:.1f} GiB memory each) ...")
        cluster = stack.enter_context(LocalCluster.start(nodes, memory_bytes, extra_args=node_args))
        _run_demo(cluster, etcd, prompts, replicas)
    print("\nnodes stopped.")


def _run_demo(cluster: LocalCluster, etcd: LocalEtcd | None, prompts: int, replicas: int) -> None:
    for node in cluster.nodes:
        print(f"  {node.node_id}: data tcp://127.0.0.1:{node.port}  admin {node.admin_url}")
    namespace = Namespace(model="HuggingFaceTB/SmolLM2-135M-Instruct", kv_dtype="float16")
    workload = _prompts(prompts)
    print(
        f"workload: {prompts} prompts = {SYSTEM_PROMPT_TOKENS}-token shared system prompt + "
        f"{TAIL_TOKENS}-token tail; {CHUNK_TOKENS}-token chunks of "
        f"{CHUNK_BYTES / 2**20:.1f} MiB"
    )
    stored: dict[bytes, bytes] = {}
    with _client(cluster, etcd, replicas) as client:
        rounds = [
            _run_round("first pass", client, workload, namespace, stored),
            _run_round("repeat", client, workload, namespace, stored),
        ]
        node_stats = client.node_stats()
    print()
    _print_table(
        ["round", "chunks", "hit chunks", "hit tokens", "PUT MiB", "PUT GB/s", "GET MiB",
         "GET GB/s", "lookup p50 ms", "wrong bytes"],
        [tally.row() for tally in rounds],
    )  # fmt: skip
    print()
    _print_table(
        ["node", "items", "memory used MiB", "hits", "misses"],
        [
            [
                node_id,
                str(stats["items"]),
                f"{stats['memory_used_bytes'] / 2**20:.0f}",
                str(stats["hits"]),
                str(stats["misses"]),
            ]
            if stats
            else [node_id, "down", "-", "-", "-"]
            for node_id, stats in node_stats.items()
        ],
    )
