"""A node's counters: plain integers bumped on the hot path, rendered only when someone asks.

The request loop only adds to attributes; `/stats` (JSON) and `/metrics` (Prometheus text) read
them at scrape time through `NodeCollector`, so serving a request never takes a metrics lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvcache.cachenode.tiered_store import TieredStore

# The disk tier's figures: /stats field (also the Prometheus name after kvcache_node_), whether it
# is a counter (else a gauge), and its help text. All zero on a node without a disk tier.
DISK_FIGURES = (
    ("disk_items", False, "Records held on disk"),
    ("disk_used_bytes", False, "Bytes charged to the disk tier"),
    ("disk_budget_bytes", False, "The disk tier's budget"),
    ("disk_spills", True, "Records written to disk"),
    ("disk_hits", True, "Values read from disk"),
    ("disk_promotions", True, "Disk hits copied back into memory"),
    ("disk_evictions", True, "Records evicted from disk"),
    ("disk_write_errors", True, "Disk writes that failed: full disk, file too large, EIO"),
    ("disk_corrupt_dropped", True, "Torn, corrupt or undecryptable records removed"),
    ("disk_rejected", True, "Values not written: over the whole budget or their checksum"),
)


def disk_figures(store: TieredStore) -> dict[str, int]:
    disk = store.disk
    if disk is None:
        return {name: 0 for name, _, _ in DISK_FIGURES}
    return {
        "disk_items": len(disk),
        "disk_used_bytes": disk.used_bytes,
        "disk_budget_bytes": disk.budget_bytes,
        "disk_spills": disk.writes,
        "disk_hits": disk.hits,
        "disk_promotions": store.promotions,
        "disk_evictions": disk.evictions,
        "disk_write_errors": disk.write_errors,
        "disk_corrupt_dropped": disk.corrupt_dropped,
        "disk_rejected": disk.rejected,
    }


@dataclass
class NodeStats:
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    hits: int = 0
    misses: int = 0
    rejected: int = 0  # values that can never fit the tier's budget
    bytes_received: int = 0
    bytes_sent: int = 0

    def snapshot(self, node_id: str, store: TieredStore) -> dict[str, Any]:
        tier = store.memory
        return {
            "node_id": node_id,
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "hits": self.hits,
            "misses": self.misses,
            "rejected": self.rejected,
            "bytes_received": self.bytes_received,
            "bytes_sent": self.bytes_sent,
            "items": len(tier),
            "memory_used_bytes": tier.used_bytes,
            "memory_budget_bytes": tier.budget_bytes,
            "evictions": tier.evictions,
            **disk_figures(store),
        }


class NodeCollector:
    """Prometheus collector over a node's counters and its tiers."""

    def __init__(
        self,
        node_id: str,
        stats: NodeStats,
        store: TieredStore,
        curve_denied: Callable[[], int] | None = None,
    ) -> None:
        """`curve_denied` reads the handshakes a CURVE allow-list refused (nodes with one)."""
        self._node_id = node_id
        self._stats = stats
        self._store = store
        self._curve_denied = curve_denied

    def collect(self) -> Iterator[Metric]:
        stats, tier = self._stats, self._store.memory
        requests = CounterMetricFamily(
            "kvcache_node_requests", "Requests served, by op", labels=["op"]
        )
        for op, count in sorted(stats.requests.items()):
            requests.add_metric([op], count)
        yield requests
        if self._curve_denied is not None:
            yield CounterMetricFamily(
                "kvcache_node_curve_denied",
                "CurveZMQ handshakes refused by the client allow-list",
                value=self._curve_denied(),
            )
        errors = CounterMetricFamily(
            "kvcache_node_errors", "Requests answered with an error, by code", labels=["code"]
        )
        for code, count in sorted(stats.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield CounterMetricFamily("kvcache_node_hits", "Keys found by GET", value=stats.hits)
        yield CounterMetricFamily("kvcache_node_misses", "Keys missed by GET", value=stats.misses)
        yield CounterMetricFamily(
            "kvcache_node_rejected", "Values larger than the whole budget", value=stats.rejected
        )
        yield CounterMetricFamily(
            "kvcache_node_received_bytes", "Payload bytes stored by PUT", value=stats.bytes_received
        )
        yield CounterMetricFamily(
            "kvcache_node_sent_bytes", "Payload bytes returned by GET", value=stats.bytes_sent
        )
        yield CounterMetricFamily(
            "kvcache_node_evictions", "Values evicted from memory", value=tier.evictions
        )
        yield GaugeMetricFamily("kvcache_node_items", "Values held in memory", value=len(tier))
        yield GaugeMetricFamily(
            "kvcache_node_memory_used_bytes",
            "Bytes charged to the memory tier",
            value=tier.used_bytes,
        )
        yield GaugeMetricFamily(
            "kvcache_node_memory_budget_bytes", "The memory tier's budget", value=tier.budget_bytes
        )
        figures = disk_figures(self._store)
        for name, counter, help_text in DISK_FIGURES:
            family = CounterMetricFamily if counter else GaugeMetricFamily
            yield family(f"kvcache_node_{name}", help_text, value=figures[name])
