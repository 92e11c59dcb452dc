"""A node's counters: plain integers bumped on the hot path, rendered only when someone asks.

The request loop only adds to attributes; `/stats` (JSON) and `/metrics` (Prometheus text) read
them at scrape time through `NodeCollector`, so serving a request never takes a metrics lock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvcache.cachenode.memory_tier import MemoryTier


@dataclass
class NodeStats:
    requests: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    hits: int = 0
    misses: int = 0
    rejected: int = 0  # values that can never fit the tier's budget
    bytes_received: int = 0
    bytes_sent: int = 0

    def snapshot(self, node_id: str, tier: MemoryTier) -> dict[str, Any]:
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
        }


class NodeCollector:
    """Prometheus collector over a node's counters and its memory tier."""

    def __init__(self, node_id: str, stats: NodeStats, tier: MemoryTier) -> None:
        self._node_id = node_id
        self._stats = stats
        self._tier = tier

    def collect(self) -> Iterator[Metric]:
        stats, tier = self._stats, self._tier
        requests = CounterMetricFamily(
            "kvcache_node_requests", "Requests served, by op", labels=["op"]
        )
        for op, count in sorted(stats.requests.items()):
            requests.add_metric([op], count)
        yield requests
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
