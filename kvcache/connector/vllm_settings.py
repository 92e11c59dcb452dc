"""Where the vLLM adapter finds its cluster and how it stores: `kv_connector_extra_config` first,
then `KVCACHE_*` environment variables (what the operator sets on the engines it joins), then
defaults. Unknown keys are refused by name, so a typo fails at engine start, not silently.

A cluster with CurveZMQ: `KVCACHE_CURVE_SERVER_KEY` is the nodes' public key, and
`KVCACHE_CURVE_PUBLIC_KEY` / `KVCACHE_CURVE_SECRET_KEY` the engine's own pair (Z85; without them a
fresh pair, which only nodes without an allow-list let in). Bad key text fails at engine start."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from kvcache.client.cluster import ClusterClient
from kvcache.connector.core import DEFAULT_CODEC, ENGINE_DOWN_BACKOFF_S, ENGINE_TIMEOUT_S
from kvcache.core.config import ClientConfig, CurveClientKeys, EtcdConfig, parse_bytes
from kvcache.core.keys import DEFAULT_CHUNK_TOKENS
from kvcache.core.ring import Member
from kvcache.core.secrets import curve_client_keys
from kvcache.kernels import codec_names

GiB = 1 << 30
_PARSERS: dict[str, Callable[[Any], Any]] = {"int": int, "float": float, "str": str}


@dataclass(frozen=True)
class VllmSettings:
    members: str = ""  # static members "n0=tcp://host:port,n1=..."; or etcd below
    etcd: str = ""  # etcd "host:port" where the cluster's members register
    cluster: str = "default"  # the cluster's name in etcd
    codec: str = DEFAULT_CODEC
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    local_bytes: int = 2 * GiB
    store_queue_bytes: int = GiB  # chunks copied out of the engine, waiting to be stored
    replicas: int = 1
    timeout_s: float = ENGINE_TIMEOUT_S
    down_backoff_s: float = ENGINE_DOWN_BACKOFF_S
    model: str = ""  # the model's name in chunk keys; default: vLLM's served model name
    tenant_salt: str = ""
    curve_server_key: str = ""  # the nodes' CurveZMQ public key: encrypts the engine's traffic
    curve_public_key: str = ""  # the engine's own pair, when the nodes keep an allow-list
    curve_secret_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        if self.codec not in codec_names():
            raise ValueError(f"kvcache codec {self.codec!r} is not one of {codec_names()}")
        if (
            self.chunk_tokens < 1
            or self.local_bytes < 0
            or self.store_queue_bytes < 1
            or self.replicas < 1
            or not self.timeout_s > 0
            or self.down_backoff_s < 0
        ):
            raise ValueError(f"bad kvcache settings: {self}")
        self.member_list()  # malformed members fail here
        self.curve()  # and malformed keys here

    @classmethod
    def from_sources(
        cls, extra: Mapping[str, Any] | None, env: Mapping[str, str] = os.environ
    ) -> VllmSettings:
        known = {spec.name: spec for spec in fields(cls)}
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"unknown kvcache setting(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, spec in known.items():
            raw = extra.get(name, env.get(f"KVCACHE_{name.upper()}"))
            if raw is None:
                continue
            parse = parse_bytes if name.endswith("_bytes") else _PARSERS[str(spec.type)]
            values[name] = parse(raw)
        return cls(**values)

    def member_list(self) -> list[Member]:
        members = []
        for entry in filter(None, (part.strip() for part in self.members.split(","))):
            node_id, sep, address = entry.partition("=")
            if not sep or not address.startswith("tcp://"):
                raise ValueError(f"kvcache member {entry!r} is not node_id=tcp://host:port")
            members.append(Member(node_id, address))
        return members

    def curve(self) -> CurveClientKeys | None:
        pair = {"KVCACHE_CURVE_PUBLIC_KEY": self.curve_public_key,
                "KVCACHE_CURVE_SECRET_KEY": self.curve_secret_key}  # fmt: skip
        return curve_client_keys(self.curve_server_key or None, None, env=pair)

    def client_factory(self) -> Callable[[], ClusterClient] | None:
        """Makes a cluster client; None when no cluster is configured (local tier only)."""
        config = ClientConfig(
            timeout_s=self.timeout_s,
            down_backoff_s=self.down_backoff_s,
            replicas=self.replicas,
            curve=self.curve(),
        )
        if self.etcd:
            etcd = EtcdConfig(self.etcd, self.cluster)
            return lambda: ClusterClient.from_etcd(etcd, config)
        members = self.member_list()
        if members:
            return lambda: ClusterClient(members, config)
        return None
