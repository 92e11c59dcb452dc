"""The cluster client against real node processes: round trips, prefixes, eviction, dead nodes,
and nodes that answer with wrong bytes or garbage."""

from __future__ import annotations

import os
import threading
import time

import msgpack
import pytest
import zmq
from sample_keys import make_keys

from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig
from kvcache.core.keys import Namespace, chunk_keys
from kvcache.core.protocol import PROTOCOL_VERSION, decode_header
from kvcache.core.ring import Member

SIZES = [0, 1, 100, 65535, 65536, (2 << 20) - 1, 2 << 20, (2 << 20) + 1, (5 << 20) + 3]


def test_round_trips_values_of_every_size(start_cluster):
    cluster = start_cluster(3, memory_bytes=256 << 20)
    keys = make_keys(len(SIZES))
    values = [os.urandom(size) for size in SIZES]
    metas = [{"depth": i} for i in range(len(SIZES))]
    with ClusterClient(cluster.members) as client:
        assert client.put(keys, values, metas) == [True] * len(keys)
        got = client.get(keys)
        assert [bytes(v) for v in got] == values
        assert [v.meta for v in got] == metas
        assert client.contains(keys) == [True] * len(keys)
        assert client.delete(keys) == [True] * len(keys)
        assert client.get(keys) == [None] * len(keys)
        assert client.contains(keys) == [False] * len(keys)
        assert client.delete(keys[:1]) == [False]


@pytest.mark.parametrize("size", [32 << 20, 64 << 20])
def test_round_trips_large_values(start_cluster, size):
    cluster = start_cluster(3, memory_bytes=256 << 20)
    key = make_keys(1, f"large{size}")
    value = os.urandom(size)
    with ClusterClient(cluster.members) as client:
        assert client.put(key, [value]) == [True]
        (got,) = client.get(key)
        assert got is not None and len(got) == size
        target = bytearray(size)
        assert got.readinto(target) == size
        assert target == value


def test_accepts_any_buffer_and_splits_multidimensional_views(start_cluster):
    cluster = start_cluster(1)
    keys = make_keys(2, "buffers")
    flat = bytearray(os.urandom(4096))
    shaped = memoryview(bytes(flat)).cast("B", (64, 64))
    with ClusterClient(cluster.members) as client:
        assert client.put(keys, [flat, shaped]) == [True, True]
        assert [bytes(v) for v in client.get(keys)] == [bytes(flat), bytes(flat)]


def test_lookup_prefix_stops_at_the_first_hole(start_cluster):
    cluster = start_cluster(3)
    namespace = Namespace(model="test-model")
    keys = chunk_keys(list(range(10 * 16)), namespace, chunk_tokens=16)
    with ClusterClient(cluster.members) as client:
        assert client.lookup_prefix(keys) == 0
        stored = [k for i, k in enumerate(keys) if i != 4]
        client.put(stored, [b"x" * 1000] * len(stored))
        assert client.lookup_prefix(keys) == 4
        client.put([keys[4]], [b"y"])
        assert client.lookup_prefix(keys) == 10
        client.delete([keys[0]])
        assert client.lookup_prefix(keys) == 0
        assert client.lookup_prefix([]) == 0


def test_memory_never_exceeds_budget_and_oldest_values_go_first(start_cluster):
    budget = 8 << 20
    cluster = start_cluster(1, memory_bytes=budget)
    keys = make_keys(24, "evict")
    values = [os.urandom(1 << 20) for _ in keys]
    with ClusterClient(cluster.members) as client:
        for key, value in zip(keys, values):
            assert client.put([key], [value]) == [True]
            (stats,) = client.node_stats().values()
            assert stats["memory_used_bytes"] <= budget
        got = client.get(keys)
        assert got[0] is None and got[-1] is not None
        for value, found in zip(values, got):
            assert found is None or bytes(found) == value
        assert stats["evictions"] == sum(found is None for found in got)
        # Larger than the whole budget: refused, and nothing else is lost for it.
        assert client.put(make_keys(1, "huge"), [bytes(budget + 1)]) == [False]
        assert [g is not None for g in client.get(keys)] == [g is not None for g in got]


def test_a_killed_node_turns_into_misses(start_cluster):
    cluster = start_cluster(3)
    keys = make_keys(60, "kill")
    values = [os.urandom(10_000) for _ in keys]
    config = ClientConfig(timeout_s=0.5, down_backoff_s=5.0)
    with ClusterClient(cluster.members, config) as client:
        assert all(client.put(keys, values))
        victim = cluster.nodes[0]
        on_victim = [client.ring.primary(k).node_id == victim.node_id for k in keys]
        assert any(on_victim) and not all(on_victim)
        victim.kill()

        got = client.get(keys)
        for value, found, lost in zip(values, got, on_victim):
            assert (found is None) if lost else (bytes(found) == value)
        assert client.contains(keys) == [not lost for lost in on_victim]
        assert client.put(keys, values) == [not lost for lost in on_victim]
        assert client.lookup_prefix(keys) <= on_victim.index(True)
        assert client.ping()[victim.node_id] is False

        # The dead node is skipped for a while instead of costing a timeout on every call.
        started = time.monotonic()
        client.get(keys)
        assert time.monotonic() - started < config.timeout_s
        assert client.stats.timeouts >= 1 and client.stats.skipped_down >= 1


def test_a_node_killed_during_a_stream_of_requests_never_raises_or_returns_wrong_bytes(
    start_cluster,
):
    cluster = start_cluster(3, memory_bytes=256 << 20)
    keys = make_keys(48, "stream")
    values = [os.urandom(1 << 20) for _ in keys]
    config = ClientConfig(timeout_s=0.5, down_backoff_s=0.2)
    with ClusterClient(cluster.members, config) as client:
        assert all(client.put(keys, values))
        killer = threading.Timer(0.3, cluster.nodes[1].kill)
        killer.start()
        deadline = time.monotonic() + 1.5
        rounds = 0
        while time.monotonic() < deadline:
            for value, found in zip(values, client.get(keys)):
                assert found is None or bytes(found) == value
            client.put(keys[:8], values[:8])
            rounds += 1
        killer.join()
        assert cluster.nodes[1].process.poll() is not None
        assert rounds > 3
        victim = cluster.nodes[1].node_id
        after = client.get(keys)
        for key, value, found in zip(keys, values, after):
            on_victim = client.ring.primary(key).node_id == victim
            assert (found is None) if on_victim else (bytes(found) == value)


def test_bad_arguments_raise_before_anything_is_sent(start_cluster):
    cluster = start_cluster(1)
    with ClusterClient(cluster.members) as client:
        with pytest.raises(ValueError, match="32 bytes"):
            client.get([b"short"])
        with pytest.raises(ValueError, match="limit"):
            client.put(make_keys(1), [bytes(client.config.limits.max_value_bytes + 1)])
        with pytest.raises(ValueError, match="one value"):
            client.put(make_keys(2), [b"a"])
        with pytest.raises(ValueError, match="meta is over"):
            client.put(make_keys(1), [b"a"], [{"note": "x" * 200}])
        with pytest.raises(ValueError, match="meta must be a map"):
            client.put(make_keys(1), [b"a"], [["not", "a", "map"]])
        (stats,) = client.node_stats().values()
        assert stats["requests"] == {"STATS": 1}


class RogueNode:
    """A ROUTER socket in a thread that answers every request with what `answer` returns."""

    def __init__(self, answer) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.member = Member("rogue", f"tcp://127.0.0.1:{port}")
        self.answer = answer
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                identity, header, *payload = self.socket.recv_multipart()
            except zmq.ContextTerminated:
                self.socket.close()
                return
            request = decode_header(header)
            self.socket.send_multipart([identity, *self.answer(request)])

    def close(self) -> None:
        self.context.term()  # wakes the thread, which closes its own socket


def _get_reply(request, data: bytes, checksum: int) -> list[bytes]:
    values = [[len(data), 1, checksum, {}] for _ in request["keys"]]
    header = {"v": PROTOCOL_VERSION, "id": request["id"], "vals": values}
    return [msgpack.packb(header), *[data for _ in request["keys"]]]


def test_wrong_bytes_from_a_node_are_a_miss_never_returned():
    rogue = RogueNode(lambda request: _get_reply(request, b"corrupted", checksum=12345))
    try:
        with ClusterClient([rogue.member], ClientConfig(timeout_s=1.0)) as client:
            assert client.get(make_keys(3)) == [None, None, None]
            assert client.stats.checksum_mismatches == 3
    finally:
        rogue.close()


@pytest.mark.parametrize(
    "answer",
    [
        lambda request: [b"\xc1 not msgpack"],
        lambda request: [msgpack.packb({"v": 99, "id": request["id"]})],
        lambda request: [msgpack.packb({"v": PROTOCOL_VERSION, "id": request["id"]})],
        lambda request: [msgpack.packb({"v": PROTOCOL_VERSION, "id": [1]})],
        lambda request: _get_reply(request, b"abc", 0)[:1],  # frames promised, none sent
        lambda request: [
            msgpack.packb(
                {
                    "v": PROTOCOL_VERSION,
                    "id": request["id"],
                    "vals": [[1 << 40, 1, 0, {}]] * len(request["keys"]),
                }
            )
        ],
    ],  # fmt: skip
    ids=["not-msgpack", "wrong-version", "no-values", "unhashable-id", "missing-frames", "huge"],
)
def test_garbage_from_a_node_is_a_miss_never_an_exception(answer):
    rogue = RogueNode(answer)
    try:
        with ClusterClient([rogue.member], ClientConfig(timeout_s=0.3)) as client:
            assert client.get(make_keys(2)) == [None, None]
    finally:
        rogue.close()
