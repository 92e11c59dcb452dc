"""Membership records: what a cache node publishes about itself in etcd, and a ring view built
from them.

A node holds a lease on `/kvcache/<cluster>/members/<node_id>` whose value is a `MemberRecord`
(JSON, so `etcdctl get` shows it readably). Clients and the router list and watch that prefix and
build a `RingView`: the ring plus its epoch, the etcd revision it reflects, so every process that
has seen the same revision places keys identically and logs can say which ring a decision used.

This module never does I/O: the node's registration and the clients' watchers live in
`kvcache.cachenode.membership` and `kvcache.client.membership`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from kvcache.core.protocol import PROTOCOL_VERSION
from kvcache.core.ring import HashRing, Member

MEMBERS_ROOT = "/kvcache"


def members_prefix(cluster: str) -> bytes:
    """The etcd prefix under which a cluster's members register (with its trailing slash)."""
    if not cluster or "/" in cluster:
        raise ValueError(f"cluster name must be non-empty and contain no '/': {cluster!r}")
    return f"{MEMBERS_ROOT}/{cluster}/members/".encode()


def member_key(cluster: str, node_id: str) -> bytes:
    if not node_id or "/" in node_id:
        raise ValueError(f"node id must be non-empty and contain no '/': {node_id!r}")
    return members_prefix(cluster) + node_id.encode()


@dataclass(frozen=True)
class MemberRecord:
    """One node as it announces itself: where to reach it and how large a share it takes."""

    node_id: str
    address: str
    zone: str = ""
    weight: float = 1.0
    memory_bytes: int = 0
    disk_bytes: int = 0
    protocol_version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> MemberRecord:
        """Parse a record, raising ValueError on anything that is not a well-formed record: a
        watcher skips such a value instead of building a ring from it."""
        try:
            fields = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"member record is not JSON: {error}") from None
        if not isinstance(fields, dict):
            raise ValueError("member record must be a JSON object")
        expected = {
            "node_id": str, "address": str, "zone": str, "weight": (int, float),
            "memory_bytes": int, "disk_bytes": int, "protocol_version": int,
        }  # fmt: skip
        for name, kind in expected.items():
            if name in fields and (not isinstance(fields[name], kind) or fields[name] is True):
                raise ValueError(f"member record field {name} has the wrong type")
        unknown = set(fields) - set(expected)
        known = {name: value for name, value in fields.items() if name not in unknown}
        if not known.get("node_id") or not known.get("address"):
            raise ValueError("member record needs node_id and address")
        weight = known.get("weight", 1.0)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"member record weight must be a positive number, got {weight}")
        return cls(**known)  # unknown fields are ignored: newer nodes may announce more

    def member(self) -> Member:
        return Member(
            node_id=self.node_id, address=self.address, zone=self.zone, weight=self.weight
        )


@dataclass(frozen=True)
class RingView:
    """A ring and the membership epoch it was built at (0 for a static member list)."""

    epoch: int
    ring: HashRing

    @classmethod
    def of(cls, epoch: int, records: Iterable[MemberRecord]) -> RingView:
        """The ring over the records that speak this client's protocol version."""
        members = [r.member() for r in records if r.protocol_version == PROTOCOL_VERSION]
        return cls(epoch, HashRing(members))

    @property
    def node_ids(self) -> frozenset[str]:
        return frozenset(member.node_id for member in self.ring.members)
