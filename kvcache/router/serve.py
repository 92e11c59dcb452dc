"""`kvcache router`: the router process, from its flags to a running uvicorn server.

Engines are given as `NAME=URL` (or a bare URL, named by position), each optionally with the ZMQ
endpoint of its KV events (`NAME=tcp://host:port`, `--engine-events`) and of their replay
(`--engine-replay`). With `--tokenizer` requests are routed by vLLM's block hashes (the engines
must run with `--prefix-caching-hash-algo sha256_cbor` and the given `PYTHONHASHSEED`); without it,
by text. With a cluster (`--cluster-etcd` or `--cluster-members`) the router also counts what an
engine could load from kvcache instead of prefilling, in the chunk keys its connector publishes
(`kvcache:chunk_namespace_info` on its /metrics) salted as the operator salted them; nodes that
speak CurveZMQ need `KVCACHE_CURVE_SERVER_KEY` (and the router's pair, `KVCACHE_CURVE_PUBLIC_KEY`
/ `_SECRET_KEY`) in its environment, as the connector does.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI

from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig, CurveClientKeys, EtcdConfig
from kvcache.core.ring import Member
from kvcache.router.app import ProxySettings, create_app
from kvcache.router.discovery import DiscoveredEngine, KubernetesAPI, PodWatcher
from kvcache.router.engines import Engine, EnginePool, HealthSettings
from kvcache.router.policy import ClusterLookup, EngineEvents, PolicySettings, PrefixPolicy
from kvcache.router.tokenize import Tokenizer


@dataclass(frozen=True)
class ClusterSettings:
    """Where the cache cluster is. What each engine's connector binds into its chunk keys comes
    from the engine itself (its /metrics), its salt from the operator (the pod's env)."""

    etcd: str = ""
    name: str = "default"
    members: tuple[Member, ...] = ()
    lookup_budget_s: float = 0.02  # a request's longest wait for the cluster's answer
    curve: CurveClientKeys | None = None  # the nodes speak CurveZMQ

    def lookup(self) -> ClusterLookup:
        config = ClientConfig(timeout_s=0.2, down_backoff_s=5.0, curve=self.curve)
        if self.etcd:
            etcd = EtcdConfig(self.etcd, self.name)

            def client() -> ClusterClient:
                return ClusterClient.from_etcd(etcd, config)
        else:

            def client() -> ClusterClient:
                return ClusterClient(list(self.members), config)

        return ClusterLookup(client, self.lookup_budget_s)


@dataclass(frozen=True)
class PodDiscovery:
    """Engines are the ready pods `selector` matches in `namespaces` (Kubernetes API)."""

    selector: str
    namespaces: tuple[str, ...]
    api: KubernetesAPI | None = None  # None: the pod's own service account


@dataclass(frozen=True)
class RouterSettings:
    engines: dict[str, str] = field(default_factory=dict)  # name -> base URL
    events: dict[str, EngineEvents] = field(default_factory=dict)
    tokenizer: str | None = None
    policy: PolicySettings = field(default_factory=PolicySettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    cluster: ClusterSettings | None = None
    discovery: PodDiscovery | None = None
    tenant_salt: str = field(default="", repr=False)  # of the listed engines' chunk keys
    proxy: ProxySettings = field(default_factory=ProxySettings)

    def __post_init__(self) -> None:
        if bool(self.engines) == bool(self.discovery):
            raise ValueError("give the router its engines, or a pod selector to find them by")
        unknown = sorted(set(self.events) - set(self.engines))
        if unknown:
            raise ValueError(f"KV events given for engines that are not listed: {unknown}")


def parse_named(values: list[str], what: str) -> dict[str, str]:
    """`NAME=VALUE` entries (a bare value is named e0, e1, ... by position)."""
    named: dict[str, str] = {}
    for position, entry in enumerate(values):
        name, sep, value = entry.partition("=")
        if not sep:
            name, value = f"e{position}", entry
        if not name or not value or name in named:
            raise ValueError(f"bad {what} {entry!r}: expected NAME=VALUE with unique names")
        named[name] = value.rstrip("/")
    return named


def build_app(settings: RouterSettings) -> FastAPI:
    pool = EnginePool(settings=settings.health)
    pool.set_engines(
        Engine(name, url, tenant_salt=settings.tenant_salt)
        for name, url in settings.engines.items()
    )
    tokenizer = Tokenizer(settings.tokenizer) if settings.tokenizer else None
    cluster = settings.cluster.lookup() if settings.cluster else None
    policy = PrefixPolicy(settings.policy, tokenizer, cluster, settings.events)
    for name in settings.engines:
        policy.index.add_engine(name)
    background = []
    if settings.discovery is not None:

        def engines_changed(engines: dict[str, DiscoveredEngine]) -> None:
            pool.set_engines(
                Engine(
                    engine.name,
                    engine.url,
                    tenant_salt=engine.tenant_salt,
                    dp_rank=engine.dp_rank,
                )  # fmt: skip
                for engine in engines.values()
            )
            policy.set_engines({engine.name: engine.events for engine in engines.values()})

        found = settings.discovery
        watcher = PodWatcher(
            found.api or KubernetesAPI.in_cluster(),
            list(found.namespaces),
            found.selector,
            engines_changed,
        )
        background.append(watcher.run)
    return create_app(pool, policy, settings.proxy, background=background)


def serve(settings: RouterSettings, host: str, port: int, log_level: str = "info") -> None:
    app = build_app(settings)
    # What the imports and the tokenizer made (~70k objects, 350k with transformers) lives as long
    # as the process: out of the collector's reach, a full collection no longer stalls every
    # request for tens of milliseconds (benchmarks/router_overhead.py)
    gc.collect()
    gc.freeze()
    # A request leaves little cyclic garbage, but at the default threshold (700 new objects)
    # the young generation was collected every ~15 requests, 0.2 ms each, and the older ones
    # every ~150 (0.5-5 ms): ~0.4 s of stalls per 20k requests, against ~15 ms at this one
    gc.set_threshold(20_000, 20, 20)
    # uvicorn's access log (a line per request) only at DEBUG: it cost 0.1 ms of the router's
    # ~0.9 ms of CPU per request; /metrics counts the requests
    uvicorn.run(
        app, host=host, port=port, log_level=log_level.lower(),
        access_log=log_level.lower() == "debug",
    )  # fmt: skip
