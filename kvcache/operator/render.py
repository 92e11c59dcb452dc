"""The children of a KVCacheCluster, rendered from its spec: pure functions, no API calls.

`render_cluster(spec, ref, image)` returns every object one cluster needs, as plain dicts: the
cache nodes (StatefulSet, headless Service, PodDisruptionBudget), the ConfigMap of client
settings, the managed etcd, and the router with the RBAC its engine discovery needs. Objects
carry no owner references and no status: the handler adopts them (`kopf.adopt`) and applies them.
The same spec always renders the same objects, so an apply that finds them equal does nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvcache.operator.names import (
    ADMIN_PORT,
    CLUSTER_NAMESPACE_LABEL,
    ETCD,
    ETCD_METRICS_PORT,
    ETCD_PORT,
    HASH_SEED,
    NODE,
    NODE_PORT,
    ROUTER,
    ROUTER_PORT,
    ClusterRef,
)
from kvcache.operator.quantities import canonical
from kvcache.operator.spec import KVCacheClusterSpec

Manifest = dict[str, Any]
# What a container's env entry holds: a value, or the `valueFrom` of a reference (to a Secret's
# key, so that key text never appears in a rendered object or a record of one).
EnvValue = str | Mapping[str, Any]

DISK_MOUNT = "/var/lib/kvcache"
# The disk tier fills at most this share of its volume: the filesystem's own metadata needs
# room, and a full filesystem fails writes instead of evicting.
DISK_FILL = 0.9
# Default memory request and limit of a node beyond its memory tier: freed buffers it keeps for
# the next PUT (NodeConfig.retain_freed_bytes, 1 GiB) and the Python process. A node is a cache:
# being OOM-killed loses all it holds, so requests equal limits.
NODE_HEADROOM_BYTES = 3 << 29
USER_ID = 10001  # the image's unprivileged user (see Dockerfile)
ETCD_DATA = "/var/run/etcd"

POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": USER_ID,
    "runAsGroup": USER_ID,
    "fsGroup": USER_ID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_NAME_ENV = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
TMP_VOLUME = {"name": "tmp", "emptyDir": {}}
TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}
# The CurveZMQ variables a client of the nodes reads, each with the curveSecret key it comes
# from and whether that key may be missing. The nodes' public key turns CURVE on, so it is
# required: a client without it cannot reach a CURVE node. The clients' own pair is optional:
# without it a client makes a fresh one, which only nodes without an allow-list admit. The
# nodes' secret key is never among them.
CURVE_CLIENT_KEYS = (
    ("KVCACHE_CURVE_SERVER_KEY", "KVCACHE_CURVE_PUBLIC_KEY", False),
    ("KVCACHE_CURVE_PUBLIC_KEY", "KVCACHE_CURVE_CLIENT_PUBLIC_KEY", True),
    ("KVCACHE_CURVE_SECRET_KEY", "KVCACHE_CURVE_CLIENT_SECRET_KEY", True),
)


@dataclass(frozen=True)
class ClusterObjects:
    """`owned` live in the cluster's namespace: adopt them, and deleting the cluster deletes
    them. `elsewhere` live in the namespaces allowed to join (the router's Roles there): owner
    references cannot cross namespaces, so the handler deletes these itself, finding them by
    `rbac_labels`."""

    owned: tuple[Manifest, ...]
    elsewhere: tuple[Manifest, ...]


@dataclass(frozen=True)
class ImagePulling:
    """How the cluster's pods pull their images: the operator's chart settings (a private
    registry's credentials reach every child, not only the operator's own pod)."""

    policy: str | None = None  # imagePullPolicy; None: Kubernetes' default for the tag
    secrets: tuple[str, ...] = ()  # imagePullSecrets, by name, in the cluster's namespace

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ImagePulling:
        names = tuple(name for name in env.get("KVCACHE_IMAGE_PULL_SECRETS", "").split(",") if name)
        return cls(env.get("KVCACHE_IMAGE_PULL_POLICY") or None, names)

    def apply(self, workload: Manifest) -> None:
        """Give a StatefulSet's or Deployment's pods these settings."""
        pod = workload["spec"]["template"]["spec"]
        if self.secrets:
            pod["imagePullSecrets"] = [{"name": name} for name in self.secrets]
        if self.policy:
            for container in pod["containers"]:
                container["imagePullPolicy"] = self.policy


def render_cluster(
    spec: KVCacheClusterSpec,
    ref: ClusterRef,
    image: str,
    node_image: str | None = None,
    pulling: ImagePulling = ImagePulling(),
) -> ClusterObjects:
    """Every child of the cluster. `image` is the operator's own, for what the spec names none;
    `node_image` the one the nodes already run (`status.nodeImage`), which they keep until the
    spec names another: an operator upgrade must not restart every node, losing every memory
    tier (a router restart loses only its index)."""
    image = spec.image or image
    owned = [
        client_config_map(spec, ref),
        node_service(ref),
        node_statefulset(spec, ref, nodes_image(spec, image, node_image)),
        node_disruption_budget(ref),
    ]
    if spec.etcd.managed:
        owned += [etcd_service(ref), etcd_statefulset(spec, ref)]
    elsewhere: list[Manifest] = []
    if spec.router.enabled:
        owned += [
            router_service_account(ref),
            router_role(ref, ref.namespace),
            router_role_binding(ref, ref.namespace),
            router_deployment(spec, ref, image),
            router_service(ref),
        ]
        for namespace in engine_namespaces(spec, ref)[1:]:
            elsewhere += [router_role(ref, namespace), router_role_binding(ref, namespace)]
    # Deep copies: the render functions share constant parts, and a caller may edit an object.
    owned = copy.deepcopy(owned)
    for workload in owned:
        if workload["kind"] in ("StatefulSet", "Deployment"):
            pulling.apply(workload)
    return ClusterObjects(tuple(owned), copy.deepcopy(tuple(elsewhere)))


def nodes_image(spec: KVCacheClusterSpec, image: str, node_image: str | None) -> str:
    """The cache nodes' image: the spec's, else the one they run, else the operator's."""
    return spec.image or node_image or image


def engine_namespaces(spec: KVCacheClusterSpec, ref: ClusterRef) -> list[str]:
    """Where engines of this cluster may run: its own namespace first, then the allowed ones."""
    others = [namespace for namespace in spec.allowed_namespaces if namespace != ref.namespace]
    return [ref.namespace, *dict.fromkeys(others)]


def etcd_endpoint(spec: KVCacheClusterSpec, ref: ClusterRef) -> str:
    """host:port of the cluster's etcd, reachable from any namespace."""
    if spec.etcd.managed:
        return f"{ref.etcd}.{ref.namespace}.svc:{ETCD_PORT}"
    assert spec.etcd.endpoint is not None  # the spec's rule
    return spec.etcd.endpoint


def client_env(spec: KVCacheClusterSpec, ref: ClusterRef) -> dict[str, str]:
    """The KVCACHE_* settings a client of this cluster needs (names as the vLLM connector reads
    them: kvcache.connector.vllm_settings)."""
    return {
        "KVCACHE_ETCD": etcd_endpoint(spec, ref),
        "KVCACHE_CLUSTER": ref.etcd_cluster,
        "KVCACHE_CODEC": spec.codec,
        "KVCACHE_CHUNK_TOKENS": str(spec.chunk_tokens),
        "KVCACHE_REPLICAS": str(spec.replication),
    }


def curve_client_env(spec: KVCacheClusterSpec) -> dict[str, dict[str, Any]]:
    """The `valueFrom` of each CurveZMQ variable a client of the nodes reads (none without a
    curveSecret): references to the Secret's keys, never their text. A reference names no
    namespace: a client in another namespace reads the Secret of that name in its own (a copy
    the platform team makes), and its pod fails to start (CreateContainerConfigError) while
    that copy is missing, rather than silently miss the cache."""
    secret = spec.security.curve_secret
    if not secret:
        return {}
    return {
        variable: {"secretKeyRef": _secret_key_ref(secret, key, optional)}
        for variable, key, optional in CURVE_CLIENT_KEYS
    }


def _secret_key_ref(secret: str, key: str, optional: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return ref


def env_entry(name: str, value: EnvValue) -> dict[str, Any]:
    """A container's env entry setting `name` to a value or from a `valueFrom` reference."""
    if isinstance(value, str):
        return {"name": name, "value": value}
    return {"name": name, "valueFrom": copy.deepcopy(dict(value))}


def _metadata(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": dict(labels)}


def _byte_text(count: int) -> str:
    """Bytes as a whole number of Mi, rounded up, spelled as the API server stores it."""
    return canonical(f"{math.ceil(count / (1 << 20))}Mi")


# ----------------------------------------------------------------------------------------------
# Cache nodes


def client_config_map(spec: KVCacheClusterSpec, ref: ClusterRef) -> Manifest:
    """The cluster's client settings, for clients joined by hand (`envFrom: configMapRef`)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ref.client_config, ref.namespace, ref.labels(NODE)),
        "data": client_env(spec, ref),
    }


def node_service(ref: ClusterRef) -> Manifest:
    """Headless: gives each node pod the stable DNS name it advertises. Not-ready pods are
    published too, because membership (etcd leases), not readiness, says who is in the ring."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref.nodes, ref.namespace, ref.labels(NODE)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": ref.selector(NODE),
            "ports": [
                {"name": "data", "port": NODE_PORT, "targetPort": "data"},
                {"name": "admin", "port": ADMIN_PORT, "targetPort": "admin"},
            ],
        },
    }


def node_command(spec: KVCacheClusterSpec, ref: ClusterRef) -> list[str]:
    """`kvcache node` with the pod's name as its node id and its stable DNS name as address
    (the kubelet expands `$(POD_NAME)` from the container's environment)."""
    command = [
        "kvcache", "node",
        "--node-id", "$(POD_NAME)",
        "--host", "0.0.0.0",
        "--port", str(NODE_PORT),
        "--admin-port", str(ADMIN_PORT),
        "--memory", spec.memory,
        "--eviction", spec.eviction,
        "--etcd", etcd_endpoint(spec, ref),
        "--cluster", ref.etcd_cluster,
        "--advertise", f"tcp://$(POD_NAME).{ref.nodes}.{ref.namespace}.svc:{NODE_PORT}",
    ]  # fmt: skip
    if spec.disk_bytes:
        budget = int(spec.disk_bytes * DISK_FILL)
        command += ["--disk-dir", f"{DISK_MOUNT}/tier", "--disk", str(budget)]
    return command


def node_resources(spec: KVCacheClusterSpec) -> dict[str, Any]:
    if spec.resources:
        return spec.resources
    memory = _byte_text(spec.memory_bytes + NODE_HEADROOM_BYTES)
    return {"requests": {"memory": memory}, "limits": {"memory": memory}}


def _http_probe(path: str, port: str, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_s,
        "failureThreshold": failures,
    }


def node_statefulset(spec: KVCacheClusterSpec, ref: ClusterRef, image: str) -> Manifest:
    env_from = [
        {"secretRef": {"name": secret}}
        for secret in (spec.security.curve_secret, spec.security.at_rest_secret)
        if secret
    ]
    container: dict[str, Any] = {
        "name": "node",
        "image": image,
        "command": node_command(spec, ref),
        "env": [POD_NAME_ENV],
        "ports": [
            {"name": "data", "containerPort": NODE_PORT},
            {"name": "admin", "containerPort": ADMIN_PORT},
        ],
        "resources": node_resources(spec),
        # A node rebuilds its disk tier's index before it serves: give that up to 10 minutes.
        "startupProbe": _http_probe("/healthz", "admin", 5, 120),
        "livenessProbe": _http_probe("/healthz", "admin", 10, 3),
        "readinessProbe": _http_probe("/readyz", "admin", 5, 2),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [TMP_MOUNT],
    }
    if env_from:
        container["envFrom"] = env_from
    pod_spec: dict[str, Any] = {
        "enableServiceLinks": False,
        "securityContext": POD_SECURITY,
        "containers": [container],
        "volumes": [TMP_VOLUME],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = spec.node_selector
    if spec.tolerations:
        pod_spec["tolerations"] = list(spec.tolerations)
    if spec.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = [
            {"labelSelector": {"matchLabels": ref.selector(NODE)}, **constraint}
            for constraint in spec.topology_spread_constraints
        ]
    statefulset_spec: dict[str, Any] = {
        "serviceName": ref.nodes,
        "replicas": spec.nodes,
        # Nodes are independent of each other: start and replace them all at once.
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": ref.selector(NODE)},
        "template": {"metadata": {"labels": ref.labels(NODE)}, "spec": pod_spec},
    }
    if spec.disk_bytes:
        container["volumeMounts"].append({"name": "disk", "mountPath": DISK_MOUNT})
        claim_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": canonical(spec.disk)}},
        }
        if spec.storage_class_name:
            claim_spec["storageClassName"] = spec.storage_class_name
        statefulset_spec["volumeClaimTemplates"] = [
            {"metadata": {"name": "disk", "labels": ref.labels(NODE)}, "spec": claim_spec}
        ]
        # A disk tier is a cache: its volume goes with its node, on scale-down and deletion.
        statefulset_spec["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": "Delete",
            "whenScaled": "Delete",
        }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(ref.nodes, ref.namespace, ref.labels(NODE)),
        "spec": statefulset_spec,
    }


def node_disruption_budget(ref: ClusterRef) -> Manifest:
    """One node at a time: a drained node's chunks turn into misses until re-stored."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ref.nodes, ref.namespace, ref.labels(NODE)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": ref.selector(NODE)}},
    }


# ----------------------------------------------------------------------------------------------
# Managed etcd


def etcd_service(ref: ClusterRef) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref.etcd, ref.namespace, ref.labels(ETCD)),
        "spec": {
            "clusterIP": "None",
            "selector": ref.selector(ETCD),
            "ports": [{"name": "client", "port": ETCD_PORT, "targetPort": "client"}],
        },
    }


def etcd_statefulset(spec: KVCacheClusterSpec, ref: ClusterRef) -> Manifest:
    """One member; its peer URL is loopback because it never has peers. Data on an emptyDir:
    membership is leases the nodes write again within a TTL after a restart."""
    peer = "http://127.0.0.1:2380"
    command = [
        "etcd",
        "--name", "etcd",
        "--data-dir", f"{ETCD_DATA}/data",
        "--listen-client-urls", f"http://0.0.0.0:{ETCD_PORT}",
        "--advertise-client-urls", f"http://{etcd_endpoint(spec, ref)}",
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"etcd={peer}",
        "--listen-metrics-urls", f"http://0.0.0.0:{ETCD_METRICS_PORT}",
    ]  # fmt: skip
    container = {
        "name": "etcd",
        "image": spec.etcd.image,
        "command": command,
        "ports": [
            {"name": "client", "containerPort": ETCD_PORT},
            {"name": "metrics", "containerPort": ETCD_METRICS_PORT},
        ],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
        "livenessProbe": _http_probe("/health", "metrics", 10, 3),
        "readinessProbe": _http_probe("/health", "metrics", 5, 2),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": "data", "mountPath": ETCD_DATA}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(ref.etcd, ref.namespace, ref.labels(ETCD)),
        "spec": {
            "serviceName": ref.etcd,
            "replicas": 1,
            "selector": {"matchLabels": ref.selector(ETCD)},
            "template": {
                "metadata": {"labels": ref.labels(ETCD)},
                "spec": {
                    "enableServiceLinks": False,
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }


# ----------------------------------------------------------------------------------------------
# Router


def engine_selector_text(ref: ClusterRef) -> str:
    return ",".join(f"{key}={value}" for key, value in ref.engine_labels().items())


def router_command(spec: KVCacheClusterSpec, ref: ClusterRef) -> list[str]:
    """`kvcache router` discovering its engines through the Kubernetes API: pods that carry the
    cluster's engine labels, in the namespaces allowed to join, reached at the ports their
    `kvcache.io/engine-port`, `kv-events-port` and `kv-replay-port` annotations name (written by
    the engine injection, kvcache.operator.join)."""
    command = [
        "kvcache", "router",
        "--host", "0.0.0.0",
        "--port", str(ROUTER_PORT),
        "--engine-selector", engine_selector_text(ref),
        "--block-size", str(spec.router.block_size),
        "--hash-seed", HASH_SEED,
        "--history-ttl-s", str(spec.router.history_ttl_seconds),
        "--speculative-ttl-s", str(spec.router.speculative_ttl_seconds),
        "--index-capacity-blocks", str(spec.router.index_capacity_blocks),
        "--score-min-match-tokens", str(spec.router.min_match_tokens),
        "--score-prefill-s-per-token", repr(spec.router.prefill_seconds_per_token),
        "--score-load-s-per-token", repr(spec.router.load_seconds_per_token),
        "--first-byte-timeout-s", str(spec.router.first_byte_timeout_seconds),
        "--idle-timeout-s", str(spec.router.idle_timeout_seconds),
    ]  # fmt: skip
    for namespace in engine_namespaces(spec, ref):
        command += ["--engine-namespace", namespace]
    if spec.router.tokenizer:
        command += ["--tokenizer", spec.router.tokenizer]
    # it asks the nodes what each engine could load, in the keys the engine's connector
    # publishes and salted as `join` salted that engine's namespace
    command += ["--cluster-etcd", etcd_endpoint(spec, ref), "--cluster", ref.etcd_cluster]
    return command


def router_service_account(ref: ClusterRef) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(ref.router, ref.namespace, ref.labels(ROUTER)),
    }


def rbac_labels(ref: ClusterRef) -> dict[str, str]:
    """The router's Roles and RoleBindings, in any namespace, carry the cluster's namespace too:
    `app.kubernetes.io/instance` alone does not tell two clusters of one name apart."""
    return {**ref.labels(ROUTER), CLUSTER_NAMESPACE_LABEL: ref.namespace}


def router_role(ref: ClusterRef, namespace: str) -> Manifest:
    """Read pods: the router watches the joined engines' pods of one namespace."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(ref.router, namespace, rbac_labels(ref)),
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }


def router_role_binding(ref: ClusterRef, namespace: str) -> Manifest:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(ref.router, namespace, rbac_labels(ref)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ref.router},
        "subjects": [{"kind": "ServiceAccount", "name": ref.router, "namespace": ref.namespace}],
    }


def router_deployment(spec: KVCacheClusterSpec, ref: ClusterRef, image: str) -> Manifest:
    container: dict[str, Any] = {
        "name": "router",
        "image": image,
        "command": router_command(spec, ref),
        "env": [
            # A tokenizer named by its hub id is downloaded to HF_HOME; the root filesystem is
            # read-only.
            {"name": "HF_HOME", "value": "/tmp/huggingface"},
            # it asks the nodes what each engine could load: a client of theirs, with its keys
            *(env_entry(name, value) for name, value in curve_client_env(spec).items()),
        ],
        "ports": [{"name": "http", "containerPort": ROUTER_PORT}],
        # live while it serves; ready (in its Service) while it has an engine to route to
        "livenessProbe": _http_probe("/livez", "http", 10, 3),
        "readinessProbe": _http_probe("/healthz", "http", 5, 2),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [TMP_MOUNT],
    }
    if spec.router.resources:
        container["resources"] = spec.router.resources
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ref.router, ref.namespace, ref.labels(ROUTER)),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": ref.selector(ROUTER)},
            "template": {
                "metadata": {"labels": ref.labels(ROUTER)},
                "spec": {
                    "serviceAccountName": ref.router,
                    "enableServiceLinks": False,
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": [TMP_VOLUME],
                },
            },
        },
    }


def router_service(ref: ClusterRef) -> Manifest:
    """The OpenAI-compatible endpoint clients call, on port 80."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref.router, ref.namespace, ref.labels(ROUTER)),
        "spec": {
            "selector": ref.selector(ROUTER),
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }
