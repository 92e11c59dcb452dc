"""What every object of a KVCacheCluster is called and labelled, and the ports it listens on.

The render functions, the engine injection and (later) the handlers all name and select objects
through here, so a child's name or selector is written in exactly one place.

Children carry `app.kubernetes.io/*` labels and never `kvcache.io/cluster`: that label marks the
joined engines' pods, which the router discovers by it, and a cache node carrying it would be
taken for an engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvcache.core.engine_labels import (  # noqa: F401 - the operator's names
    CLUSTER_LABEL,
    CLUSTER_NAMESPACE_LABEL,
    DATA_PARALLEL_ANNOTATION,
    ENGINE_PORT,
    ENGINE_PORT_ANNOTATION,
    EVENTS_PORT_ANNOTATION,
    REPLAY_PORT_ANNOTATION,
    TENANT_SALT_ENV,
)
from kvcache.operator.schema import Pattern

# The user's annotation on an engine Deployment: `<name>` or `<namespace>/<name>`.
CLUSTER_ANNOTATION = "kvcache.io/cluster"
# Picks the vLLM container of a Deployment with several containers.
CONTAINER_ANNOTATION = "kvcache.io/container"
# What joining added to a Deployment, so that leaving removes exactly that.
JOINED_ANNOTATION = "kvcache.io/joined"
# Why a Deployment could not join, while that holds: a refusal is announced once, not per pass.
REFUSED_ANNOTATION = "kvcache.io/join-refused"

MANAGED_BY = "kvcache-operator"
NODE, ROUTER, ETCD = "cache-node", "router", "etcd"

NODE_PORT = 7400
ADMIN_PORT = 7401
ROUTER_PORT = 8080
ETCD_PORT = 2379
ETCD_METRICS_PORT = 2381
EVENTS_PORT = 5557
# Each data-parallel rank publishes on these ports plus its rank (vLLM's offset_endpoint_port):
# the replay port sits a rank range above the events port, or rank 1's events would take it.
MAX_DATA_PARALLEL_RANKS = 64
REPLAY_PORT = EVENTS_PORT + MAX_DATA_PARALLEL_RANKS
# The engines' PYTHONHASHSEED: with sha256_cbor, vLLM's block hashes then reproduce in the router.
HASH_SEED = "0"

# A DNS-1035 label short enough that "<name>-node-<ordinal>" and the StatefulSet controller's
# "<name>-node-<hash>" revision labels stay within 63 characters.
CLUSTER_NAME = Pattern(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "a DNS-1035 label (a-z, 0-9, -)")
CLUSTER_NAME_MAX = 40


@dataclass(frozen=True)
class ClusterRef:
    """One KVCacheCluster, by namespace and name; the names of its children follow."""

    namespace: str
    name: str

    def __post_init__(self) -> None:
        if len(self.name) > CLUSTER_NAME_MAX or not re.match(CLUSTER_NAME.regex, self.name):
            raise ValueError(
                f"cluster name {self.name!r} must be {CLUSTER_NAME.meaning}, "
                f"at most {CLUSTER_NAME_MAX} characters"
            )

    @classmethod
    def from_annotation(cls, value: str, engine_namespace: str) -> ClusterRef:
        """`<name>` (a cluster in the engine's namespace) or `<namespace>/<name>`."""
        namespace, _, name = value.strip().rpartition("/")
        return cls(namespace or engine_namespace, name)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def etcd_cluster(self) -> str:
        """The cluster's name in etcd: unique across namespaces sharing an external etcd (a
        namespace name holds no dot)."""
        return f"{self.namespace}.{self.name}"

    @property
    def nodes(self) -> str:
        """The StatefulSet of cache nodes and its headless Service."""
        return f"{self.name}-node"

    @property
    def router(self) -> str:
        """The router's Deployment, Service, ServiceAccount, Role and RoleBinding."""
        return f"{self.name}-router"

    @property
    def etcd(self) -> str:
        """The managed etcd's StatefulSet and Service."""
        return f"{self.name}-etcd"

    @property
    def client_config(self) -> str:
        """The ConfigMap of KVCACHE_* settings a client of this cluster reads."""
        return f"{self.name}-kvcache-client"

    def selector(self, component: str) -> dict[str, str]:
        """The labels that select one component's pods (stable: a selector cannot change)."""
        return {
            "app.kubernetes.io/name": "etcd" if component == ETCD else "kvcache",
            "app.kubernetes.io/instance": self.name,
            "app.kubernetes.io/component": component,
        }

    def labels(self, component: str) -> dict[str, str]:
        return {
            **self.selector(component),
            "app.kubernetes.io/part-of": "kvcache",
            "app.kubernetes.io/managed-by": MANAGED_BY,
        }

    def children_selector(self) -> dict[str, str]:
        """Selects every child of this cluster in its namespace, whatever its component."""
        return {"app.kubernetes.io/instance": self.name, "app.kubernetes.io/managed-by": MANAGED_BY}

    def engine_labels(self) -> dict[str, str]:
        """What the router selects joined engines' pods by."""
        return {CLUSTER_LABEL: self.name, CLUSTER_NAMESPACE_LABEL: self.namespace}

    def node_selector_text(self) -> str:
        """The cache node pods' selector as text (status.selector, for the scale subresource)."""
        return ",".join(f"{key}={value}" for key, value in self.selector(NODE).items())
