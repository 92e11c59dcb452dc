"""Membership in a real etcd with real node processes: registration, lease expiry after a kill,
graceful leave, rejoin, replication across a dead node, read-repair after a join."""

from __future__ import annotations

import asyncio
import os
import time

import aetcd
import httpx
import pytest
from sample_keys import make_keys

from kvcache.cachenode.launcher import NodeProcess, free_port
from kvcache.client.cluster import ClusterClient
from kvcache.client.membership import EtcdMembership
from kvcache.core.config import ClientConfig, EtcdConfig
from kvcache.core.membership import MemberRecord, member_key
from kvcache.local_etcd import LocalEtcd

LEASE_TTL_S = 2


def etcd_args(etcd_server, cluster_name: str, ttl: int = LEASE_TTL_S) -> list[str]:
    return ["--etcd", etcd_server.endpoint, "--cluster", cluster_name, "--lease-ttl", str(ttl)]


@pytest.fixture
def membership(etcd_server, cluster_name):
    source = EtcdMembership(EtcdConfig(etcd_server.endpoint, cluster_name))
    yield source
    source.close()


def has_nodes(*node_ids: str):
    return lambda view: set(node_ids) <= view.node_ids


def lacks_node(node_id: str):
    return lambda view: node_id not in view.node_ids


def test_nodes_register_with_their_address_and_clients_see_every_change(
    start_cluster, etcd_server, cluster_name, membership
):
    cluster = start_cluster(3, extra_args=etcd_args(etcd_server, cluster_name))
    ids = [node.node_id for node in cluster.nodes]
    view = membership.wait_for(has_nodes(*ids), timeout_s=10)
    assert view is not None and view.node_ids == set(ids)
    assert {m.address for m in view.ring.members} == {n.member.address for n in cluster.nodes}
    assert view.epoch > 0

    cluster.nodes[0].stop()
    later = membership.wait_for(lacks_node(ids[0]), timeout_s=10)
    assert later is not None and later.epoch > view.epoch


def test_a_killed_node_drops_out_within_the_lease_ttl_plus_one_second(
    start_cluster, etcd_server, cluster_name, membership
):
    cluster = start_cluster(3, extra_args=etcd_args(etcd_server, cluster_name))
    victim = cluster.nodes[1]
    assert membership.wait_for(has_nodes(*(n.node_id for n in cluster.nodes)), timeout_s=10)
    killed_at = time.monotonic()
    victim.kill()
    view = membership.wait_for(lacks_node(victim.node_id), timeout_s=LEASE_TTL_S + 5)
    dropped_after = time.monotonic() - killed_at
    assert view is not None, "the killed node never left the ring"
    assert dropped_after <= LEASE_TTL_S + 1, f"dropped after {dropped_after:.2f} s"
    assert view.node_ids == {cluster.nodes[0].node_id, cluster.nodes[2].node_id}


def test_a_gracefully_stopped_node_leaves_at_once_and_rejoins_on_restart(
    start_cluster, etcd_server, cluster_name, membership
):
    cluster = start_cluster(1, extra_args=etcd_args(etcd_server, cluster_name, ttl=30))
    (node,) = cluster.nodes
    assert membership.wait_for(has_nodes(node.node_id), timeout_s=10)
    stopped_at = time.monotonic()
    assert node.stop() == 0
    assert membership.wait_for(lacks_node(node.node_id), timeout_s=5)
    assert time.monotonic() - stopped_at < 5  # revoked: far inside the 30 s lease

    node.start()
    node.wait_ready()
    assert membership.wait_for(has_nodes(node.node_id), timeout_s=10)


def test_a_client_from_etcd_follows_the_ring_and_reads_through_a_killed_node_with_r2(
    start_cluster, etcd_server, cluster_name
):
    cluster = start_cluster(3, extra_args=etcd_args(etcd_server, cluster_name))
    keys = make_keys(120, "replicated")
    values = [os.urandom(20_000) for _ in keys]
    config = ClientConfig(replicas=2, timeout_s=0.5, down_backoff_s=5.0)
    etcd = EtcdConfig(etcd_server.endpoint, cluster_name)
    with ClusterClient.from_etcd(etcd, config) as client:
        deadline = time.monotonic() + 10
        while len(client.ring) < 3 and time.monotonic() < deadline:
            client.ping()
            time.sleep(0.05)
        assert len(client.ring) == 3 and client.epoch > 0
        assert all(client.put(keys, values))
        stats = client.node_stats()
        assert sum(s["items"] for s in stats.values()) == 2 * len(keys)  # every key twice

        victim = cluster.nodes[2]
        victim.kill()
        # Before the ring drops the node: its keys come from their second owners.
        got = client.get(keys)
        assert [bytes(v) for v in got] == values
        assert client.contains(keys) == [True] * len(keys)
        assert client.lookup_prefix(keys) == len(keys)

        deadline = time.monotonic() + LEASE_TTL_S + 5
        while victim.node_id in client.ring and time.monotonic() < deadline:
            client.ping()
            time.sleep(0.05)
        assert victim.node_id not in client.ring
        # After: the same, without waiting out the dead node.
        started = time.monotonic()
        assert [bytes(v) for v in client.get(keys)] == values
        assert time.monotonic() - started < config.timeout_s


def test_a_joining_node_is_filled_by_read_repair(start_cluster, etcd_server, cluster_name):
    cluster = start_cluster(2, extra_args=etcd_args(etcd_server, cluster_name))
    keys = make_keys(200, "join")
    values = [os.urandom(4096) for _ in keys]
    etcd = EtcdConfig(etcd_server.endpoint, cluster_name)
    with ClusterClient.from_etcd(etcd, ClientConfig(replicas=2)) as client:
        deadline = time.monotonic() + 10
        while len(client.ring) < 2 and time.monotonic() < deadline:
            client.ping()
            time.sleep(0.05)
        assert all(client.put(keys, values))

        joiner = NodeProcess("joiner", free_port(), free_port(), 64 << 20,
                             tuple(etcd_args(etcd_server, cluster_name)))  # fmt: skip
        cluster.nodes.append(joiner)  # stopped with the cluster
        joiner.start()
        joiner.wait_ready()
        deadline = time.monotonic() + 10
        while "joiner" not in client.ring and time.monotonic() < deadline:
            client.ping()
            time.sleep(0.05)
        assert "joiner" in client.ring
        now_on_joiner = [
            "joiner" in {m.node_id for m in client.ring.owners(key, 2)} for key in keys
        ]
        assert any(now_on_joiner)

        assert [bytes(v) for v in client.get(keys)] == values  # the old owners still have them
        assert client.stats.read_repairs > 0
        joiner_stats = client.node_stats()["joiner"]
        repaired_first_owner = sum(client.ring.primary(k).node_id == "joiner" for k in keys)
        assert joiner_stats["items"] == client.stats.read_repairs >= repaired_first_owner > 0

        # The joiner now answers its keys itself.
        assert [bytes(v) for v in client.get(keys)] == values
        assert client.node_stats()["joiner"]["hits"] >= repaired_first_owner


def test_a_node_serves_while_etcd_is_unreachable(start_cluster, cluster_name):
    dead_etcd = f"127.0.0.1:{free_port()}"
    cluster = start_cluster(1, extra_args=["--etcd", dead_etcd, "--cluster", cluster_name])
    (node,) = cluster.nodes
    assert httpx.get(f"{node.admin_url}/readyz", timeout=5).status_code == 200
    key = make_keys(1, "no-etcd")
    with ClusterClient(cluster.members) as client:
        assert client.put(key, [b"still serving"]) == [True]
        assert bytes(client.get(key)[0]) == b"still serving"
    assert node.process.poll() is None


def test_malformed_member_records_are_left_out_of_the_ring(
    start_cluster, etcd_server, cluster_name, membership
):
    cluster = start_cluster(1, extra_args=etcd_args(etcd_server, cluster_name))
    (node,) = cluster.nodes

    async def write_garbage() -> None:
        host, port = EtcdConfig(etcd_server.endpoint).host_port
        async with aetcd.Client(host=host, port=port) as etcd:
            await etcd.put(member_key(cluster_name, "garbage"), b"\x00 not json")
            await etcd.put(
                member_key(cluster_name, "impostor"),
                MemberRecord("someone-else", "tcp://127.0.0.1:1").encode(),
            )

    asyncio.run(write_garbage())
    view = membership.wait_for(has_nodes(node.node_id), timeout_s=10)
    time.sleep(0.3)  # the garbage writes came after the node's registration
    view = membership.current()
    assert view.node_ids == {node.node_id}


def test_node_refuses_a_malformed_etcd_endpoint():
    node = NodeProcess("bad-etcd", free_port(), free_port(), 1 << 20, ("--etcd", "no-port"))
    node.start()
    assert node.process.wait(30) != 0


def test_when_etcd_goes_away_clients_keep_their_last_ring_and_nodes_keep_serving(
    start_cluster, cluster_name
):
    etcd = LocalEtcd.start()
    try:
        cluster = start_cluster(2, extra_args=etcd_args(etcd, cluster_name))
        ids = {node.node_id for node in cluster.nodes}
        keys = make_keys(20, "etcd-gone")
        values = [os.urandom(1000) for _ in keys]
        etcd_config = EtcdConfig(etcd.endpoint, cluster_name)
        with ClusterClient.from_etcd(etcd_config, ClientConfig(replicas=2)) as client:
            deadline = time.monotonic() + 10
            while {m.node_id for m in client.ring.members} != ids and time.monotonic() < deadline:
                client.ping()
                time.sleep(0.05)
            epoch = client.epoch
            assert all(client.put(keys, values))
            etcd.stop()
            time.sleep(LEASE_TTL_S + 1)  # longer than the nodes' leases: no one can tell now
            assert [bytes(v) for v in client.get(keys)] == values
            assert {m.node_id for m in client.ring.members} == ids and client.epoch == epoch
        assert all(node.process.poll() is None for node in cluster.nodes)
    finally:
        etcd.stop()
