"""A real `kvcache node` process: its admin HTTP API, its counters, its shutdown and its CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import msgpack
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from sample_keys import make_keys

from kvcache.cachenode.launcher import NodeProcess, free_port
from kvcache.cachenode.memory_tier import ENTRY_OVERHEAD_BYTES, FRAME_OVERHEAD_BYTES
from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig

MiB = 1 << 20
STATS_FIELDS = {
    "node_id",
    "requests",
    "errors",
    "hits",
    "misses",
    "rejected",
    "bytes_received",
    "bytes_sent",
    "items",
    "memory_used_bytes",
    "memory_budget_bytes",
    "evictions",
    "disk_items",
    "disk_used_bytes",
    "disk_budget_bytes",
    "disk_spills",
    "disk_hits",
    "disk_promotions",
    "disk_evictions",
    "disk_write_errors",
    "disk_corrupt_dropped",
    "disk_rejected",
}


def admin_get(node: NodeProcess, path: str) -> httpx.Response:
    return httpx.get(f"{node.admin_url}{path}", timeout=5.0)


def stats(node: NodeProcess) -> dict:
    response = admin_get(node, "/stats")
    assert response.status_code == 200
    return response.json()


def samples(node: NodeProcess) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, parsed as Prometheus text: (name, sorted labels) -> value."""
    response = admin_get(node, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvcache", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


# ---- admin HTTP ----------------------------------------------------------------------------


def test_healthz_and_readyz_answer_200_while_serving(start_cluster):
    (node,) = start_cluster(count=1, memory_bytes=8 * MiB).nodes
    health = admin_get(node, "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = admin_get(node, "/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert admin_get(node, "/no-such-page").status_code == 404


def test_stats_json_starts_empty_and_moves_after_put_and_get(start_cluster):
    budget = 8 * MiB
    (node,) = start_cluster(count=1, memory_bytes=budget).nodes
    before = stats(node)
    assert set(before) == STATS_FIELDS
    assert before["node_id"] == node.node_id
    assert before["memory_budget_bytes"] == budget
    assert before["requests"] == {} and before["errors"] == {}
    assert before["items"] == before["memory_used_bytes"] == before["evictions"] == 0

    hit, miss = make_keys(2, "stats")
    value = os.urandom(3 * MiB)  # three 2 MiB-or-less frames from the client
    with ClusterClient([node.member]) as client:
        assert client.put([hit], [value]) == [True]
        got = client.get([hit, miss])
        assert bytes(got[0]) == value and got[1] is None

    after = stats(node)
    assert after["requests"] == {"PUT": 1, "GET": 1}
    assert (after["hits"], after["misses"]) == (1, 1)
    assert after["bytes_received"] == after["bytes_sent"] == len(value)
    assert after["items"] == 1
    frames = -(-len(value) // ClientConfig().frame_bytes)
    charged = len(value) + ENTRY_OVERHEAD_BYTES + FRAME_OVERHEAD_BYTES * frames
    assert after["memory_used_bytes"] == charged
    assert after["errors"] == {} and after["rejected"] == after["evictions"] == 0


def test_stats_count_rejections_evictions_and_errors(start_cluster):
    budget = 1 * MiB
    (node,) = start_cluster(count=1, memory_bytes=budget).nodes
    keys = make_keys(4, "evict")
    with ClusterClient([node.member]) as client:
        assert client.put(keys[:1], [bytes(2 * MiB)]) == [False]  # larger than the budget
        assert client.put(keys[1:], [bytes(400_000)] * 3) == [True] * 3  # the third evicts one
    with zmq.Context() as context, context.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(node.member.address)
        raw.send(msgpack.packb({"v": 1, "id": 9, "op": "NOPE"}))
        assert raw.poll(5000)
        assert msgpack.unpackb(raw.recv())["code"] == "unknown_op"

    counted = stats(node)
    assert counted["rejected"] == 1
    assert counted["evictions"] == 1 and counted["items"] == 2
    assert counted["memory_used_bytes"] <= budget
    assert counted["errors"] == {"unknown_op": 1}
    assert counted["requests"]["PUT"] >= 2


def test_metrics_are_prometheus_text_with_the_node_counters(start_cluster):
    (node,) = start_cluster(count=1, memory_bytes=8 * MiB).nodes
    keys = make_keys(2, "metrics")
    with ClusterClient([node.member]) as client:
        assert client.put(keys[:1], [b"x" * 1000]) == [True]
        client.get(keys)
        client.contains(keys)
    with zmq.Context() as context, context.socket(zmq.DEALER) as raw:
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(node.member.address)
        raw.send(b"\xc1")  # not msgpack
        assert raw.poll(5000)
        raw.recv()

    found = samples(node)
    assert found[("kvcache_node_requests_total", (("op", "PUT"),))] == 1
    assert found[("kvcache_node_requests_total", (("op", "GET"),))] == 1
    assert found[("kvcache_node_requests_total", (("op", "CONTAINS"),))] == 1
    assert found[("kvcache_node_errors_total", (("code", "malformed_header"),))] == 1
    assert found[("kvcache_node_hits_total", ())] == 1
    assert found[("kvcache_node_misses_total", ())] == 1
    assert found[("kvcache_node_received_bytes_total", ())] == 1000
    assert found[("kvcache_node_sent_bytes_total", ())] == 1000
    assert found[("kvcache_node_rejected_total", ())] == 0
    assert found[("kvcache_node_evictions_total", ())] == 0
    assert found[("kvcache_node_items", ())] == 1
    assert found[("kvcache_node_memory_budget_bytes", ())] == 8 * MiB
    json_stats = stats(node)
    assert found[("kvcache_node_memory_used_bytes", ())] == json_stats["memory_used_bytes"] > 1000


def test_stats_op_over_zeromq_agrees_with_the_http_stats(start_cluster):
    (node,) = start_cluster(count=1, memory_bytes=8 * MiB).nodes
    keys = make_keys(3, "zstats")
    with ClusterClient([node.member]) as client:
        client.put(keys, [b"a" * 10, b"b" * 20, b"c" * 30])
        client.get(keys[:2])
        over_zmq = client.node_stats()[node.node_id]
    over_http = stats(node)
    assert over_zmq is not None
    assert over_zmq["requests"] == {"PUT": 1, "GET": 1, "STATS": 1}
    assert over_zmq == over_http


# ---- shutdown ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_node_gracefully_with_exit_code_0(start_cluster, signum):
    (node,) = start_cluster(count=1, memory_bytes=8 * MiB).nodes
    # A client that has talked to it and is still connected must not hold the shutdown up.
    client = ClusterClient([node.member], ClientConfig(timeout_s=1.0))
    try:
        assert client.put(make_keys(1, "bye"), [b"x" * 100_000]) == [True]
        started = time.monotonic()
        node.process.send_signal(signum)
        assert node.process.wait(timeout=5.0) == 0
        assert time.monotonic() - started < 5.0
        # Both fronts are closed: the admin port refuses, the data port serves nothing.
        with pytest.raises(httpx.TransportError):
            admin_get(node, "/healthz")
        assert client.get(make_keys(1, "bye")) == [None]
    finally:
        client.close()


@pytest.mark.parametrize("taken", ["data", "admin"])
def test_a_node_whose_port_is_taken_exits_non_zero_instead_of_half_serving(taken):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        data_port = busy_port if taken == "data" else free_port()
        admin_port = busy_port if taken == "admin" else free_port()
        node = NodeProcess(f"busy-{taken}", data_port, admin_port, 1 * MiB)
        node.start()
        try:
            assert node.process.wait(timeout=20) != 0
        finally:
            node.kill()


# ---- the command line ----------------------------------------------------------------------


def test_cli_node_help_lists_its_options():
    result = run_cli("node", "--help")
    assert result.returncode == 0, result.stderr
    for option in ("--node-id", "--host", "--port", "--admin-port", "--memory"):
        assert option in result.stdout


def test_cli_help_lists_the_node_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "node" in result.stdout


@pytest.mark.parametrize(
    "args",
    [("node",), ("node", "--node-id", "n", "--memory", "lots"), ("no-such-command",), ()],
    ids=["missing_node_id", "bad_memory", "unknown_command", "no_command"],
)
def test_cli_refuses_bad_arguments_with_a_non_zero_exit(args):
    result = run_cli(*args)
    assert result.returncode != 0
    assert result.stderr
