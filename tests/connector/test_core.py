"""The connector core against real node processes: what one connector stores, another loads;
a repeated prompt is served from the local tier with no bytes on the network; the local budget
holds; a dead cluster or a full queue costs hits, never an exception."""

from __future__ import annotations

import threading

import pytest
import torch

from kvcache.client.cluster import ClusterClient
from kvcache.connector.core import Connector, ConnectorConfig
from kvcache.connector.local_tier import LocalTier
from kvcache.connector.store_worker import StoreWorker
from kvcache.core.config import ClientConfig
from kvcache.core.keys import Namespace
from kvcache.kernels import decode, encode
from kvcache.kernels.cachegen import CacheGenCodec
from kvcache.kernels.raw import RawCodec

CHUNK = 16
SHAPE = (2, 2, 0, 2, 8)  # layers, K/V, tokens (per prompt), heads, head_dim


def prompt_kv(tokens: int, seed: int = 0) -> torch.Tensor:
    shape = (SHAPE[0], 2, tokens, SHAPE[3], SHAPE[4])
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def connector(members, codec=None, dtype="float32", **config) -> Connector:
    namespace = Namespace(model="test-model", kv_dtype=dtype)
    factory = (lambda: ClusterClient(members, ClientConfig(timeout_s=0.5))) if members else None
    return Connector(
        ConnectorConfig(namespace, chunk_tokens=CHUNK, **config), codec or RawCodec(), factory
    )


def test_the_local_tier_keeps_its_budget_and_evicts_the_least_recent():
    tier = LocalTier(100)
    assert tier.put(b"a", bytes(40)) and tier.put(b"b", bytes(40))
    assert tier.get(b"a") is not None  # a is now the most recent
    assert tier.put(b"c", bytes(40))
    assert tier.get(b"b") is None and tier.get(b"a") is not None
    assert tier.used_bytes == 80 <= tier.budget_bytes
    assert not tier.put(b"huge", bytes(101)) and tier.used_bytes == 80
    assert tier.prefix_length([b"a", b"c", b"b", b"a"]) == 2


def test_a_chain_loses_its_deep_end_first():
    tier = LocalTier(30)
    tier.put_chain([b"0", b"1", b"2"], [bytes(10)] * 3)
    tier.put(b"other", bytes(10))  # evicts the chain's deepest chunk, not its first
    assert tier.prefix_length([b"0", b"1", b"2"]) == 2
    tier.touch_chain([b"0", b"1"])
    tier.put(b"more", bytes(10))  # now "other" is the least recent
    assert tier.get(b"other") is None and tier.prefix_length([b"0", b"1"]) == 2


def test_the_store_worker_drops_what_does_not_fit_and_survives_failures():
    release = threading.Event()

    def slow_sink(keys, blobs):
        release.wait(10)
        if keys[0] == b"bad":
            raise OSError("cluster gone")
        return sum(map(len, blobs))

    # the budget is in bytes: 3 + 4 float32s fit in 28 bytes, one more chunk does not
    worker = StoreWorker(lambda chunk: bytes(chunk.numel()), slow_sink, capacity_bytes=28)
    try:
        assert worker.submit([b"bad"], [torch.zeros(3)])  # taken by the worker, then blocks
        assert worker.submit([b"k1"], [torch.zeros(4)])  # fills the budget
        assert worker.queued_bytes == 28
        assert not worker.submit([b"k2"], [torch.zeros(1)])
        release.set()
        assert worker.drain(10)
        assert worker.queued_bytes == 0  # what was stored (or failed) no longer counts
        assert worker.submit([b"k3"], [torch.zeros(7)])
        assert worker.drain(10)
        assert (worker.stats.stored, worker.stats.failed, worker.stats.dropped) == (2, 1, 1)
        assert worker.stats.bytes_stored == 4 + 7
    finally:
        release.set()
        worker.close()


@pytest.mark.parametrize("codec", [RawCodec(), CacheGenCodec()], ids=["none", "cachegen"])
def test_a_second_connector_loads_what_the_first_stored(start_cluster, codec):
    cluster = start_cluster(3)
    tokens = list(range(1000, 1000 + 5 * CHUNK + 3))  # 5 full chunks and a partial one
    kv = prompt_kv(len(tokens))
    writer, reader = connector(cluster.members, codec), connector(cluster.members, codec)
    try:
        assert writer.store(tokens, kv) == 5
        assert writer.store_worker.drain(10) and writer.store_worker.stats.stored == 5
        hit = reader.lookup(tokens)
        assert (hit.local_chunks, hit.cluster_chunks, hit.tokens) == (0, 5, 5 * CHUNK)
        loaded = reader.load(hit)
        # exactly what the codec gives back for each chunk (for `none`: the KV itself)
        expected = torch.cat(
            [decode(encode(part, codec)) for part in kv[:, :, : 5 * CHUNK].split(CHUNK, dim=2)],
            dim=2,
        )
        assert torch.equal(loaded, expected)
        if isinstance(codec, RawCodec):
            assert torch.equal(loaded, kv[:, :, : 5 * CHUNK])
        assert reader.stats.cluster_hit_tokens == 5 * CHUNK
        assert reader.stats.bytes_loaded_cluster > 0
        # a different continuation shares only the first chunks
        other = tokens[: 2 * CHUNK + 5] + [7] * 40
        assert reader.lookup(other).chunks == 2
    finally:
        writer.close()
        reader.close()


def test_a_repeated_prompt_is_served_locally_with_no_bytes_on_the_network(start_cluster):
    cluster = start_cluster(2)
    tokens = list(range(4 * CHUNK))
    kv = prompt_kv(len(tokens), seed=1)
    engine = connector(cluster.members, local_bytes=3 * 2 * 2 * CHUNK * 2 * 8 * 4 + 3 * 1024)
    with ClusterClient(cluster.members) as observer:
        try:
            engine.store(tokens, kv)
            assert engine.store_worker.drain(10)
            budget = engine.local.budget_bytes
            assert 0 < engine.local.used_bytes <= budget and len(engine.local) == 3  # of 4

            before = observer.node_stats()
            hit = engine.lookup(tokens[: 3 * CHUNK])
            loaded = engine.load(hit)
            after = observer.node_stats()
            assert hit.local_chunks == 3 and hit.cluster_chunks == 0
            assert torch.equal(loaded, kv[:, :, : 3 * CHUNK])
            for node in before:  # the nodes saw nothing but the observer's own STATS calls
                assert after[node]["bytes_sent"] == before[node]["bytes_sent"]
                assert after[node]["requests"].get("GET") == before[node]["requests"].get("GET")
                assert after[node]["requests"].get("CONTAINS") == (
                    before[node]["requests"].get("CONTAINS")
                )
            assert engine.stats.bytes_loaded_cluster == 0 and engine.local.used_bytes <= budget
        finally:
            engine.close()


def test_a_dead_cluster_costs_hits_never_an_exception(start_cluster):
    cluster = start_cluster(2)
    tokens = list(range(3 * CHUNK))
    engine = connector(cluster.members, local_bytes=0)  # nothing local: every hit is remote
    try:
        engine.store(tokens, prompt_kv(len(tokens)))
        assert engine.store_worker.drain(10)
        assert engine.lookup(tokens).chunks == 3
        cluster.stop()
        hit = engine.lookup(tokens)
        assert hit.chunks == 0 and engine.load(hit) is None
        engine.store(tokens + [1] * CHUNK, prompt_kv(4 * CHUNK))
        assert engine.store_worker.drain(30)
        assert engine.store_worker.stats.failed + engine.store_worker.stats.stored >= 4
    finally:
        engine.close()


def test_without_a_cluster_the_local_tier_still_serves():
    engine = connector(None)
    tokens = list(range(2 * CHUNK))
    kv = prompt_kv(len(tokens))
    try:
        engine.store(tokens, kv)
        assert engine.store_worker.drain(10)
        hit = engine.lookup(tokens)
        assert hit.local_chunks == 2 and torch.equal(engine.load(hit), kv)
    finally:
        engine.close()


@pytest.mark.parametrize(
    "wrong",
    [
        pytest.param(lambda kv: kv[:, :, : CHUNK - 4], id="fewer-tokens"),
        pytest.param(lambda kv: torch.cat([kv, kv[:, :, :4]], dim=2), id="more-tokens"),
        pytest.param(lambda kv: kv[:, :, :, :1].contiguous(), id="other-heads"),
        pytest.param(lambda kv: kv.to(torch.float16), id="other-dtype"),
    ],
)
def test_a_well_formed_blob_of_the_wrong_shape_is_a_corrupt_chunk(start_cluster, wrong):
    """A blob that decodes, but not to this chunk's KV (another token count, other heads or
    dtype), would put KV at the wrong positions: the load stops before it."""
    cluster = start_cluster(1)
    tokens = list(range(3 * CHUNK))
    kv = prompt_kv(len(tokens))
    reader = connector(cluster.members)
    try:
        keys = reader.keys(tokens)
        chunks = [kv[:, :, i * CHUNK : (i + 1) * CHUNK] for i in range(3)]
        blobs = [encode(chunks[0], RawCodec()), encode(wrong(chunks[1]), RawCodec()),
                 encode(chunks[2], RawCodec())]  # fmt: skip
        with ClusterClient(cluster.members) as client:
            assert client.put(keys, blobs) == [True] * 3
        hit = reader.lookup(tokens)
        assert hit.chunks == 3
        loaded = reader.load(hit)
        assert torch.equal(loaded, kv[:, :, :CHUNK])
        assert reader.stats.load_failures == 1
    finally:
        reader.close()
