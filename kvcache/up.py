"""`kvcache up`: a local cluster of cache node processes, and two engines serving the real
SmolLM2-135M-Instruct through it.

With `--etcd` it also starts a local etcd server: the nodes register there under leases and the
clients build their ring from what they watch, as in production; without it, the clients are
given the static member list.

Engines A and B (the transformers model in this process, each with its own connector and local
tier, both on the same cluster) take turns serving the workloads of `kvcache.demo.workload`: a
support chat that resends the whole conversation every turn, and questions over shared
documents. Each request looks up its longest cached prefix (the engine's local tier first, then
the cluster), loads it, prefills the rest, generates, and stores its new chunks in the
background; the same prompt is also prefilled in full without the cache, for the TTFT and the
generated tokens to compare against. `--kill-cluster-after N` stops every node after N requests:
the rest are still served, and what only the cluster held becomes a miss.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from kvcache.cachenode.launcher import LocalCluster
from kvcache.client.cluster import ClusterClient
from kvcache.client.membership import EtcdMembership, MembershipSource, StaticMembership
from kvcache.connector import smollm2
from kvcache.connector.core import (
    DEFAULT_CODEC,
    ENGINE_DOWN_BACKOFF_S,
    ENGINE_TIMEOUT_S,
    Connector,
    ConnectorConfig,
)
from kvcache.connector.hf import generate
from kvcache.core.config import ClientConfig, EtcdConfig
from kvcache.core.keys import Namespace
from kvcache.demo import workload
from kvcache.kernels import codec_by_name, codec_names
from kvcache.local_etcd import LocalEtcd

CLUSTER_NAME = "local"
MODEL = smollm2.MODEL_NAME
STORE_WAIT_S = 60.0  # a request's stores finish before the next request looks up
ENGINES = "AB"


@dataclass(frozen=True)
class DemoSettings:
    nodes: int = 3
    memory_bytes: int = 1 << 30  # each node's memory tier
    with_etcd: bool = False
    replicas: int = 1
    codec: str = DEFAULT_CODEC
    max_new_tokens: int = 24
    requests: int | None = None  # serve only the first N requests of the workloads
    kill_cluster_after: int | None = None  # stop every node after this many requests
    local_bytes: int = 2 << 30  # each engine's local tier; 0 sends every hit over the network

    def __post_init__(self) -> None:
        if self.codec not in codec_names():
            raise ValueError(f"codec {self.codec!r} is not one of {codec_names()}")
        if (
            self.max_new_tokens < 1
            or (self.requests is not None and self.requests < 1)
            or (self.kill_cluster_after is not None and self.kill_cluster_after < 0)
        ):
            raise ValueError(f"bad demo settings: {self}")


@dataclass(frozen=True)
class RequestResult:
    workload: str
    label: str
    engine: str
    prompt_tokens: int
    local_hit_tokens: int
    cluster_hit_tokens: int
    cluster_bytes: int  # loaded from the cluster
    ttft_full_s: float  # full prefill, no cache
    ttft_cached_s: float  # through the connector: lookup, load, prefill of the rest
    same_tokens: int  # generated tokens equal to full prefill's at the same position
    new_tokens: int
    cluster_up: bool

    @property
    def hit_tokens(self) -> int:
        return self.local_hit_tokens + self.cluster_hit_tokens


@dataclass(frozen=True)
class DemoSummary:
    requests: list[RequestResult]
    node_stats: dict[str, dict[str, Any] | None]  # every node's counters at the end; None: down
    cluster_killed_after: int | None  # requests served before every node was stopped


def run_local_demo(
    settings: DemoSettings, loaded: tuple[Any, torch.nn.Module] | None = None
) -> DemoSummary:
    """Start the cluster, serve the workloads, print what happened; `loaded` is a (tokenizer,
    model) pair already loaded (tests share one)."""
    if loaded is None:
        print(f"loading {MODEL} (float32, on the CPU) ...", flush=True)
        started = time.perf_counter()
        loaded = smollm2.load(progress=True)
        print(f"model loaded in {time.perf_counter() - started:.1f} s")
    tokenizer, model = loaded
    with contextlib.ExitStack() as stack:
        etcd = None
        node_args: list[str] = []
        if settings.with_etcd:
            etcd = stack.enter_context(LocalEtcd.start())
            node_args = ["--etcd", etcd.endpoint, "--cluster", CLUSTER_NAME]
            print(f"etcd at {etcd.endpoint}; members under /kvcache/{CLUSTER_NAME}/members/")
        print(
            f"starting {settings.nodes} cache nodes "
            f"({settings.memory_bytes / 2**30:.1f} GiB memory each) ..."
        )
        cluster = stack.enter_context(
            LocalCluster.start(settings.nodes, settings.memory_bytes, extra_args=node_args)
        )
        for node in cluster.nodes:
            print(f"  {node.node_id}: data tcp://127.0.0.1:{node.port}  admin {node.admin_url}")
        membership = _membership(cluster, etcd)
        stack.callback(membership.close)
        clients = functools.partial(
            ClusterClient,
            membership,
            ClientConfig(
                timeout_s=ENGINE_TIMEOUT_S,
                down_backoff_s=ENGINE_DOWN_BACKOFF_S,
                replicas=settings.replicas,
            ),
        )
        stats_client = stack.enter_context(clients())
        engines = {
            name: stack.enter_context(contextlib.closing(_connector(clients, settings)))
            for name in ENGINES
        }
        print(
            f"engines {' and '.join(ENGINES)}: one connector each (codec {settings.codec}, "
            f"local tier {settings.local_bytes / 2**30:.1f} GiB), both on this cluster with "
            f"{settings.replicas} replica(s) per chunk; {settings.max_new_tokens} new tokens "
            "per request\n"
        )
        results, killed_after = _serve_workloads(tokenizer, model, engines, cluster, settings)
        live = stats_client.node_stats()
        summary = DemoSummary(
            results, {node.node_id: live.get(node.node_id) for node in cluster.nodes}, killed_after
        )
        _print_summary(summary)
    print("\nnodes stopped.")
    return summary


def _serve_workloads(
    tokenizer: Any,
    model: torch.nn.Module,
    engines: dict[str, Connector],
    cluster: LocalCluster,
    settings: DemoSettings,
) -> tuple[list[RequestResult], int | None]:
    """Serve the requests in order, alternating engines; stop the nodes when it is time."""
    results: list[RequestResult] = []
    killed_after = None
    plan = workload.requests(tokenizer)
    request = next(plan)
    generate(model, None, request.prompt, 1)  # the first long prefill is slow once; not timed
    while True:
        if len(results) == settings.kill_cluster_after:
            cluster.stop()
            killed_after = len(results)
            print(f"--- cluster down: all {len(cluster.nodes)} cache nodes stopped ---")
        engine = ENGINES[len(results) % len(ENGINES)]
        result, tokens = _serve(
            model, engines[engine], engine, request, settings.max_new_tokens, killed_after is None
        )
        results.append(result)
        print(_request_line(result))
        if len(results) == settings.requests:
            break
        try:
            request = plan.send(workload.reply_text(tokenizer, tokens))
        except StopIteration:
            break
    return results, killed_after


def _serve(
    model: torch.nn.Module,
    connector: Connector,
    engine: str,
    request: workload.Request,
    new_tokens: int,
    cluster_up: bool,
) -> tuple[RequestResult, list[int]]:
    """One request through the connector, and the same prompt by full prefill to compare."""
    full = generate(model, None, request.prompt, new_tokens)
    before = replace(connector.stats)
    served = generate(model, connector, request.prompt, new_tokens)
    after = connector.stats
    connector.store_worker.drain(STORE_WAIT_S)
    result = RequestResult(
        workload=request.workload,
        label=request.label,
        engine=engine,
        prompt_tokens=len(request.prompt),
        local_hit_tokens=after.local_hit_tokens - before.local_hit_tokens,
        cluster_hit_tokens=after.cluster_hit_tokens - before.cluster_hit_tokens,
        cluster_bytes=after.bytes_loaded_cluster - before.bytes_loaded_cluster,
        ttft_full_s=full.ttft_s,
        ttft_cached_s=served.ttft_s,
        same_tokens=sum(a == b for a, b in zip(served.tokens, full.tokens)),
        new_tokens=len(served.tokens),
        cluster_up=cluster_up,
    )
    return result, served.tokens


def _request_line(result: RequestResult) -> str:
    return (
        f"{result.workload:4} {result.label:15} engine {result.engine}  "
        f"{result.prompt_tokens:5} tokens, hit {result.hit_tokens:4} "
        f"(local {result.local_hit_tokens:4}, cluster {result.cluster_hit_tokens:4}, "
        f"{result.cluster_bytes / 2**20:4.1f} MiB)  "
        f"TTFT {result.ttft_full_s:5.2f} s -> {result.ttft_cached_s:5.2f} s "
        f"({result.ttft_full_s / result.ttft_cached_s:4.1f}x)  "
        f"same tokens {result.same_tokens}/{result.new_tokens}"
    )


def workload_rows(results: list[RequestResult]) -> list[list[str]]:
    """The summary table's rows: one per workload, requests after a kill in rows of their own."""
    groups: dict[str, list[RequestResult]] = {}
    for result in results:
        name = result.workload + ("" if result.cluster_up else " (cluster down)")
        groups.setdefault(name, []).append(result)
    rows = []
    for name, group in groups.items():
        prompt = sum(r.prompt_tokens for r in group)
        hits = sum(r.hit_tokens for r in group)
        full = statistics.mean(r.ttft_full_s for r in group)
        cached = statistics.mean(r.ttft_cached_s for r in group)
        same = sum(r.same_tokens for r in group)
        new = sum(r.new_tokens for r in group)
        rows.append(
            [
                name,
                str(len(group)),
                str(prompt),
                f"{hits} ({100 * hits / prompt:.0f}%)",
                f"{full:.2f}",
                f"{cached:.2f}",
                f"{full / cached:.1f}x",
                f"{sum(r.cluster_bytes for r in group) / 2**20:.1f}",
                f"{same}/{new} ({100 * same / new:.0f}%)",
            ]
        )
    return rows


def _print_summary(summary: DemoSummary) -> None:
    print()
    _print_table(
        ["workload", "requests", "prompt tokens", "hit tokens", "TTFT no cache s",
         "TTFT cache s", "speedup", "MiB from cluster", "same tokens"],
        workload_rows(summary.requests),
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
            for node_id, stats in summary.node_stats.items()
        ],
    )


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def _membership(cluster: LocalCluster, etcd: LocalEtcd | None) -> MembershipSource:
    """Where every client of the demo gets its ring: one etcd watch shared by all of them (a
    client reads it without a lock), or the static member list."""
    if etcd is None:
        return StaticMembership(cluster.members)
    membership = EtcdMembership(EtcdConfig(etcd.endpoint, CLUSTER_NAME))
    membership.wait_for(lambda view: len(view.ring) == len(cluster.nodes), 10.0)
    view = membership.current()
    print(f"ring from etcd: {len(view.ring)} members at epoch {view.epoch}")
    return membership


def _connector(clients: Callable[[], ClusterClient], settings: DemoSettings) -> Connector:
    namespace = Namespace(model=MODEL, kv_dtype="float32")  # the model's own dtype: no rounding
    config = ConnectorConfig(namespace, local_bytes=settings.local_bytes)
    return Connector(config, codec_by_name(settings.codec), clients)
