"""Shared fixtures: real cache node processes on loopback, always stopped after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from kvcache.cachenode.launcher import LocalCluster


@pytest.fixture
def start_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """`start_cluster(count=3, memory_bytes=64 << 20)` starts node processes for this test."""
    started: list[LocalCluster] = []

    def start(count: int = 3, memory_bytes: int = 64 << 20) -> LocalCluster:
        cluster = LocalCluster.start(count, memory_bytes)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.stop()
