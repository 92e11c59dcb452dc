"""Shared fixtures: real cache node processes and a real etcd server on loopback, always stopped
after the test (etcd after the session).

Triton kernels run on the CPU through Triton's interpreter wherever no GPU is present. That must
be chosen before anything imports `triton` (the codecs do, and tests of several packages import
the codecs), hence here, in the conftest pytest loads first.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kvcache.cachenode.launcher import LocalCluster, NodeProcess, free_port
from kvcache.local_etcd import LocalEtcd

_cluster_names = itertools.count()


@pytest.fixture
def start_cluster() -> Iterator[Callable[..., LocalCluster]]:
    """`start_cluster(count=3, memory_bytes=64 << 20, extra_args=...)` starts node processes for
    this test (`extra_args` as in `LocalCluster.start`)."""
    started: list[LocalCluster] = []

    def start(count: int = 3, memory_bytes: int = 64 << 20, **options) -> LocalCluster:
        cluster = LocalCluster.start(count, memory_bytes, **options)
        started.append(cluster)
        return cluster

    yield start
    for cluster in started:
        cluster.stop()


@pytest.fixture
def start_node() -> Iterator[Callable[..., NodeProcess]]:
    """`start_node(*flags, memory_bytes=64 MiB, env={...})` runs one ready `kvcache node` process
    with these extra flags (and environment) for this test."""
    started: list[NodeProcess] = []

    def start(
        *flags: str, memory_bytes: int = 64 << 20, env: dict[str, str] | None = None
    ) -> NodeProcess:
        node = NodeProcess(
            f"node-{len(started)}", free_port(), free_port(), memory_bytes, flags, env or {}
        )
        started.append(node)
        node.start()
        node.wait_ready()
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[LocalEtcd]:
    """One real etcd for the session (Debian's etcd-server; `make test` installs it)."""
    with LocalEtcd.start() as server:
        yield server


@pytest.fixture
def cluster_name() -> str:
    """A cluster name no other test uses, so tests share one etcd without seeing each other."""
    return f"test-{next(_cluster_names)}"
