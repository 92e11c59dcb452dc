"""Configuration dataclasses shared by the processes, and parsing of byte quantities.

Sizes are written the Kubernetes way ("64Gi", "512Mi", "2G") so the same strings work in a
KVCacheCluster spec, on the command line and in tests.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kvcache.core.protocol import DEFAULT_LIMITS, Limits

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTPE]i?|k)?\s*$")
_FACTORS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def parse_bytes(quantity: str | int) -> int:
    """'64Gi' -> 68719476736; plain integers pass through. Raises ValueError on anything else."""
    if isinstance(quantity, int):
        if quantity < 0:
            raise ValueError(f"byte quantity must be >= 0, got {quantity}")
        return quantity
    match = _QUANTITY.match(quantity)
    if match is None:
        raise ValueError(f"not a byte quantity: {quantity!r} (examples: 512Mi, 64Gi, 1000000)")
    number, suffix = match.groups()
    return int(float(number) * _FACTORS[suffix])


@dataclass(frozen=True)
class EtcdConfig:
    """Where membership lives: one etcd endpoint ("host:port"), the cluster's name (its members
    are under /kvcache/<cluster>/members/), and the lease TTL a dead node drops out within."""

    endpoint: str
    cluster: str = "default"
    lease_ttl_s: int = 5

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint must be host:port, got {self.endpoint!r}")
        return host, int(port)


@dataclass(frozen=True)
class CurveServerKeys:
    """CurveZMQ on a node: its key pair (Z85 text) and the client public keys it lets in
    (None lets in any client that knows the server's public key)."""

    public_key: bytes
    secret_key: bytes
    allowed_clients: frozenset[bytes] | None = None


@dataclass(frozen=True)
class CurveClientKeys:
    """CurveZMQ on a client: the nodes' public key and the client's own key pair (Z85 text)."""

    server_public_key: bytes
    public_key: bytes
    secret_key: bytes


@dataclass(frozen=True)
class NodeConfig:
    """One cache node: where it listens, how much its tiers may hold, how it joins its cluster."""

    node_id: str
    host: str = "127.0.0.1"
    port: int = 7400
    admin_port: int = 7401
    memory_bytes: int = 1 << 30
    # Freed buffers kept for the next PUT's parts (see kvcache.core.allocator).
    retain_freed_bytes: int = 1 << 30
    limits: Limits = DEFAULT_LIMITS
    eviction: str = "prefix"  # "prefix" (deep and cold chunks first) or "lru"
    disk_dir: str | None = None  # the disk tier's data directory; None: memory only
    disk_bytes: int = 0  # the disk tier's byte budget
    at_rest_key: bytes | None = None  # 32-byte AES-256-GCM key for the disk tier
    curve: CurveServerKeys | None = None
    etcd: EtcdConfig | None = None  # None: no registration (static member lists)
    zone: str = ""
    weight: float = 1.0  # share of the ring relative to the other members
    advertise_address: str | None = None  # what clients connect to; default: `address`

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def public_address(self) -> str:
        return self.advertise_address or self.address


@dataclass(frozen=True)
class ClientConfig:
    """How a cluster client batches, pipelines and gives up on requests.

    `frame_bytes` splits values so no libzmq message part exceeds ~2 MiB (larger parts each get a
    fresh, page-faulting allocation); `put_batch_bytes` and `get_batch_bytes` size one request
    (a GET reply's size is estimated from the values seen so far); small requests keep a reply's
    frames in cache while its checksums are verified. `window` requests per node are in flight at
    once so acknowledgements never stall the pipe.
    """

    timeout_s: float = 2.0
    frame_bytes: int = 2 << 20
    put_batch_bytes: int = 8 << 20
    get_batch_bytes: int = 4 << 20
    window: int = 2
    down_backoff_s: float = 1.0
    # Freed receive buffers this process keeps for the next GET (see kvcache.core.allocator).
    retain_freed_bytes: int = 256 << 20
    limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)
    # Each key is stored on this many distinct nodes (distinct zones first).
    replicas: int = 1
    # A GET that finds a value past its first owner writes it back to the owners that missed.
    read_repair: bool = True
    curve: CurveClientKeys | None = None
