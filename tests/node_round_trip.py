"""The check that a node still serves normal traffic after whatever a test put it through."""

from __future__ import annotations

import os

from sample_keys import make_keys

from kvcache.cachenode.launcher import NodeProcess
from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig

MiB = 1 << 20


def assert_round_trip(node: NodeProcess, label: str, delete: bool = False) -> None:
    """A normal PUT and GET through the cluster client return the same bytes and metas (and,
    with `delete`, a DELETE removes them again, leaving the node as it was)."""
    keys = make_keys(2, f"round-trip-{label}")
    values = [os.urandom(100_000), os.urandom(3 * MiB)]  # a copied value and a multi-frame one
    metas = [{"depth": 0}, {"depth": 1}]
    with ClusterClient([node.member], ClientConfig(timeout_s=10.0)) as client:
        assert client.put(keys, values, metas) == [True, True]
        got = client.get(keys)
        assert [None if value is None else bytes(value) for value in got] == values
        assert [value.meta for value in got] == metas
        if delete:
            assert client.delete(keys) == [True, True]
        assert client.stats.timeouts == 0 and not client.stats.node_errors
