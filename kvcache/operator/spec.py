"""What a KVCacheCluster asks for: its spec as frozen dataclasses, parsed once at the boundary.

These classes are the one source of truth for the spec: the CRD's schema is generated from them
(`kvcache.operator.crd`), and the operator reads every resource through
`KVCacheClusterSpec.from_dict`, which applies the same defaults, bounds and cross-field rules.
This module must stay importable without torch or a cluster: the operator's image has neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvcache.core.config import parse_bytes
from kvcache.operator.schema import Pattern, Rule, parse, spec_field

# kvcache.kernels.codec_names(), which the operator cannot import (the codecs need torch);
# a test keeps the two equal.
CODECS = ("cachegen", "int8", "none")
DEFAULT_CODEC = "int8"

_SUFFIX = "(k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?"
# Kubernetes quantities without sign, exponent or milli-units: valid both as a PVC's size and
# for `kvcache.core.config.parse_bytes`.
BYTES = Pattern(rf"^[0-9]+(\.[0-9]+)?{_SUFFIX}$", "a byte quantity such as 0, 512Mi or 100Gi")
POSITIVE_BYTES = Pattern(
    rf"^([0-9]*[1-9][0-9]*(\.[0-9]+)?|[0-9]+\.[0-9]*[1-9][0-9]*){_SUFFIX}$",
    "a byte quantity above zero such as 512Mi or 64Gi",
)
DNS_LABEL = Pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "a namespace name (a DNS label)")
HOST_PORT = Pattern(r"^[^\s/]+:[0-9]{1,5}$", "host:port")


@dataclass(frozen=True)
class SecuritySpec:
    curve_secret: str | None = spec_field(
        "Secret whose keys become the cache nodes' environment: KVCACHE_CURVE_PUBLIC_KEY and "
        "KVCACHE_CURVE_SECRET_KEY (Z85) turn on CurveZMQ encryption, KVCACHE_CURVE_ALLOWED_CLIENTS "
        "(Z85 public keys) admits only those clients. Optional KVCACHE_CURVE_CLIENT_PUBLIC_KEY "
        "and KVCACHE_CURVE_CLIENT_SECRET_KEY: the key pair of the joined engines and the router "
        "(list its public key in KVCACHE_CURVE_ALLOWED_CLIENTS; without it they make fresh "
        "pairs, which only nodes without an allow-list admit). Engines and the router get the "
        "nodes' public key and the client pair, never the nodes' secret key. An engine in "
        "another namespace reads a Secret of this name in its own namespace: copy "
        "KVCACHE_CURVE_PUBLIC_KEY and the client pair there (not the nodes' secret key); "
        "without that copy its pods do not start.",
        None,
    )
    at_rest_secret: str | None = spec_field(
        "Secret with KVCACHE_AT_REST_KEY (64 hex characters): the disk tier is encrypted with "
        "AES-256-GCM.",
        None,
    )


@dataclass(frozen=True)
class RouterSpec:
    enabled: bool = spec_field("Run the prefix-aware router in front of the joined engines.", True)
    replicas: int = spec_field("Router pods.", 1, minimum=1)
    block_size: int = spec_field(
        "The engines' KV block size in tokens (vLLM's --block-size): the router hashes requests "
        "in blocks of this size to match the engines' KV events.",
        16,
        minimum=1,
    )
    tokenizer: str | None = spec_field(
        "The served model's tokenizer (a Hugging Face id or a path in the router's image): "
        "requests are routed by vLLM's exact block hashes. Without it, by their text.",
        None,
    )
    history_ttl_seconds: int = spec_field(
        "How long a routed prefix counts on its engine where no KV event will confirm it (text "
        "routing without a tokenizer, engines that publish no events): a conversation whose "
        "next turn comes within it returns to its engine.",
        300,
        minimum=1,
    )
    speculative_ttl_seconds: int = spec_field(
        "How long a routed prefix counts on an engine that publishes KV events before an event "
        "confirms it.",
        5,
        minimum=1,
    )
    index_capacity_blocks: int = spec_field(
        "Prefix-index entries the router keeps per engine (size it from the engines' KV blocks).",
        65536,
        minimum=1,
    )
    min_match_tokens: int = spec_field(
        "A prefix an engine holds counts only from this many tokens: a short prefix every "
        "request shares (a system prompt) is no reason to prefer an engine.",
        768,
        minimum=0,
    )
    prefill_seconds_per_token: float = spec_field(
        "The engines' time to prefill one token (measure it per model and GPU): weighs a "
        "prefix an engine holds against its load.",
        4e-4,
        minimum=0,
    )
    load_seconds_per_token: float = spec_field(
        "The engines' time to load one token's KV from the cache nodes (benchmarks/ttft.py).",
        4e-5,
        minimum=0,
    )
    first_byte_timeout_seconds: int = spec_field(
        "How long the router waits for an engine's first byte (a queue and a long prefill "
        "included) before it gives the engine up.",
        600,
        minimum=1,
    )
    idle_timeout_seconds: int = spec_field(
        "How long the router waits between two chunks of an answer before it drops the engine.",
        120,
        minimum=1,
    )
    resources: dict[str, Any] = spec_field(
        "Kubernetes resource requirements of each router pod.", default_factory=dict
    )


@dataclass(frozen=True)
class EtcdSpec:
    """Where the nodes register and the clients watch the ring."""

    RULES = (
        Rule(
            "self.managed || has(self.endpoint)",
            "endpoint is required when managed is false",
            lambda etcd: etcd.managed or etcd.endpoint is not None,
        ),
        Rule(
            "!self.managed || !has(self.endpoint)",
            "endpoint is only for an external etcd: set managed to false",
            lambda etcd: not etcd.managed or etcd.endpoint is None,
        ),
    )

    managed: bool = spec_field(
        "Run a single-member etcd for this cluster. Membership is soft state (the nodes write "
        "it again within a lease TTL), so it keeps no volume.",
        True,
    )
    endpoint: str | None = spec_field(
        "host:port of an external etcd (with managed: false).", None, pattern=HOST_PORT
    )
    image: str = spec_field("The managed etcd's image.", "quay.io/coreos/etcd:v3.5.17")


@dataclass(frozen=True)
class KVCacheClusterSpec:
    RULES = (
        Rule(
            "self.replication <= self.nodes",
            "replication must not exceed nodes: each chunk is stored on that many distinct nodes",
            lambda spec: spec.replication <= spec.nodes,
        ),
    )

    nodes: int = spec_field("Cache nodes (the scale subresource's replicas).", 3, minimum=1)
    memory: str = spec_field(
        "Memory tier budget of each node, e.g. 64Gi.", "4Gi", pattern=POSITIVE_BYTES
    )
    disk: str = spec_field(
        "Disk tier of each node: the size of its PersistentVolumeClaim, which the tier fills to "
        "90%. 0 keeps the cache in memory only.",
        "0",
        pattern=BYTES,
    )
    storage_class_name: str | None = spec_field(
        "StorageClass of the disk tier's volumes (default: the cluster's default class).", None
    )
    eviction: str = spec_field(
        "What a full tier gives up first: deep and cold chunks (prefix) or the oldest (lru).",
        "prefix",
        enum=("prefix", "lru"),
    )
    chunk_tokens: int = spec_field(
        "Tokens per chunk, as the engines' connectors cut prompts (a multiple of the engines' "
        "KV block size).",
        256,
        minimum=1,
    )
    replication: int = spec_field(
        "Copies of each chunk, on distinct nodes (and zones).", 1, minimum=1
    )
    codec: str = spec_field(
        "KV compression the engines use: none, int8 (about 2x) or cachegen (about 5x, lossy).",
        DEFAULT_CODEC,
        enum=CODECS,
    )
    isolation: str = spec_field(
        "Namespace: engines in different namespaces key chunks with different salts and never "
        "read each other's KV. None: every joined engine shares every chunk.",
        "Namespace",
        enum=("Namespace", "None"),
    )
    allowed_namespaces: tuple[str, ...] = spec_field(
        "Other namespaces whose Deployments may join this cluster (annotated "
        "kvcache.io/cluster: <namespace>/<name>).",
        default_factory=tuple,
        item_pattern=DNS_LABEL,
        max_items=64,
    )
    image: str | None = spec_field(
        "Image of the cache nodes and the router (default: the operator's own).", None
    )
    resources: dict[str, Any] = spec_field(
        "Kubernetes resource requirements of each cache node (default: memory requested and "
        "limited to the memory tier plus 1.5Gi for buffers and the process).",
        default_factory=dict,
    )
    node_selector: dict[str, str] = spec_field(
        "Node labels the cache node pods must run on.", default_factory=dict
    )
    tolerations: tuple[dict[str, Any], ...] = spec_field(
        "Kubernetes tolerations of the cache node pods.", default_factory=tuple
    )
    topology_spread_constraints: tuple[dict[str, Any], ...] = spec_field(
        "Kubernetes topology spread constraints of the cache node pods; a constraint without a "
        "labelSelector selects this cluster's nodes.",
        default_factory=tuple,
    )
    security: SecuritySpec = spec_field(
        "Transport encryption and disk encryption.", default_factory=SecuritySpec
    )
    router: RouterSpec = spec_field("The prefix-aware router.", default_factory=RouterSpec)
    etcd: EtcdSpec = spec_field("Membership store.", default_factory=EtcdSpec)

    @classmethod
    def from_dict(cls, spec: Any) -> KVCacheClusterSpec:
        """The spec of a resource (its `spec`, camelCase); SpecError names every bad field."""
        return parse(cls, {} if spec is None else spec, "spec")

    @property
    def memory_bytes(self) -> int:
        return parse_bytes(self.memory)

    @property
    def disk_bytes(self) -> int:
        return parse_bytes(self.disk)
