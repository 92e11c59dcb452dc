"""Tenant isolation through the tenant salt in chunk keys, against real node processes.

What this gives: a tenant's chunk keys are a keyed hash of its salt and its tokens, so a tenant
that does not know another tenant's salt cannot name, read, probe or overwrite that tenant's chunks,
even when it knows the exact token ids (a shared system prompt, say). Nodes hold no key listing a
client could walk.

What it does not give: the salt is the whole secret. A tenant that learns another's salt reads its
chunks; nodes do not authenticate tenants, only clients (CurveZMQ), so salts must travel as secrets
(a Kubernetes Secret per tenant), never in logs or request metadata. Tenants share each node's
memory budget: one tenant's writes can evict another's chunks (no per-tenant quota), and a shared
salt shares the cache on purpose.
"""

from __future__ import annotations

import os

from kvcache.client.cluster import ClusterClient
from kvcache.core.keys import Namespace, chunk_keys

CHUNK_TOKENS = 16
PROMPT = list(range(1000, 1000 + 6 * CHUNK_TOKENS))  # six full chunks both tenants know


def namespace(salt: bytes) -> Namespace:
    return Namespace(model="llama-3-8b", tenant_salt=salt)


def keys_for(salt: bytes) -> list[bytes]:
    return chunk_keys(PROMPT, namespace(salt), CHUNK_TOKENS)


def test_a_tenant_that_knows_the_token_ids_cannot_read_another_tenants_chunks(start_cluster):
    cluster = start_cluster(3)
    b_keys = keys_for(b"tenant-b")
    b_values = [os.urandom(4096) for _ in b_keys]
    with ClusterClient(cluster.members) as tenant_b, ClusterClient(cluster.members) as tenant_a:
        assert tenant_b.put(b_keys, b_values) == [True] * len(b_keys)
        for a_salt in (b"tenant-a", b""):  # its own salt, and no salt at all
            a_keys = keys_for(a_salt)
            assert not set(a_keys) & set(b_keys)
            assert tenant_a.lookup_prefix(a_keys) == 0
            assert tenant_a.get(a_keys) == [None] * len(a_keys)
            assert tenant_a.contains(a_keys) == [False] * len(a_keys)
        assert tenant_b.lookup_prefix(b_keys) == len(b_keys)
        assert [bytes(value) for value in tenant_b.get(b_keys)] == b_values


def test_a_tenant_storing_the_same_tokens_does_not_overwrite_another_tenants_chunks(start_cluster):
    cluster = start_cluster(3)
    b_keys, a_keys = keys_for(b"tenant-b"), keys_for(b"tenant-a")
    b_values = [os.urandom(1024) for _ in b_keys]
    a_values = [os.urandom(1024) for _ in a_keys]
    with ClusterClient(cluster.members) as tenant_b, ClusterClient(cluster.members) as tenant_a:
        assert tenant_b.put(b_keys, b_values) == [True] * len(b_keys)
        assert tenant_a.put(a_keys, a_values) == [True] * len(a_keys)
        assert tenant_a.delete(keys_for(b"")) == [False] * len(b_keys)  # no salt names nothing
        assert [bytes(value) for value in tenant_b.get(b_keys)] == b_values
        assert [bytes(value) for value in tenant_a.get(a_keys)] == a_values


def test_a_tenant_that_learns_the_salt_reads_the_chunks(start_cluster):
    """The salt is the secret: this is the boundary of the isolation, not a defect."""
    cluster = start_cluster(1)
    b_keys = keys_for(b"tenant-b")
    with ClusterClient(cluster.members) as tenant_b, ClusterClient(cluster.members) as tenant_a:
        assert tenant_b.put(b_keys, [b"kv"] * len(b_keys)) == [True] * len(b_keys)
        assert tenant_a.lookup_prefix(keys_for(b"tenant-b")) == len(b_keys)
