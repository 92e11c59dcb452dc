"""The one `kvcache` command: `node` runs a cache node, `router` the prefix-aware router, `up` a
local cluster and its demo, `keys` makes a CurveZMQ key pair."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvcache.core.config import EtcdConfig, NodeConfig, parse_bytes
from kvcache.core.ring import Member


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _node(args: argparse.Namespace) -> None:
    from kvcache.cachenode.node import run_node
    from kvcache.core.secrets import curve_server_keys, read_at_rest_key

    try:
        config = NodeConfig(
            node_id=args.node_id,
            host=args.host,
            port=args.port,
            admin_port=args.admin_port,
            memory_bytes=args.memory,
            eviction=args.eviction,
            disk_dir=args.disk_dir,
            disk_bytes=args.disk,
            at_rest_key=read_at_rest_key(args.at_rest_key_file),
            curve=curve_server_keys(args.curve_key_file, args.curve_allowed_clients),
            etcd=EtcdConfig(args.etcd, args.cluster, args.lease_ttl) if args.etcd else None,
            zone=args.zone,
            weight=args.weight,
            advertise_address=args.advertise,
        )
        if config.etcd is not None:
            config.etcd.host_port  # noqa: B018 - validates the endpoint before starting
    except (OSError, ValueError) as error:
        sys.exit(f"kvcache node: {error}")
    run_node(config, log_level=args.log_level)


def _keys(args: argparse.Namespace) -> None:
    import zmq.auth

    directory = Path(args.dir)
    existing = [directory / f"{args.name}{suffix}" for suffix in (".key", ".key_secret")]
    if any(path.exists() for path in existing):
        sys.exit(f"kvcache keys: {existing[0]} or its secret exists; not overwriting a key")
    directory.mkdir(parents=True, exist_ok=True)
    previous_umask = os.umask(0o077)  # the secret certificate is readable by its owner only
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, args.name)
    finally:
        os.umask(previous_umask)
    os.chmod(public_file, 0o644)
    public_key, _ = zmq.auth.load_certificate(public_file)
    print(f"public certificate: {public_file}\nsecret certificate: {secret_file}")
    print(f"public key: {public_key.decode()}")


def _up(args: argparse.Namespace) -> None:
    from kvcache.up import DemoSettings, run_local_demo

    try:
        settings = DemoSettings(
            nodes=args.nodes,
            memory_bytes=args.memory,
            with_etcd=args.etcd,
            replicas=args.replicas,
            codec=args.codec,
            max_new_tokens=args.max_new_tokens,
            requests=args.requests,
            kill_cluster_after=args.kill_cluster_after,
            local_bytes=args.local_memory,
        )
    except ValueError as error:
        sys.exit(f"kvcache up: {error}")
    run_local_demo(settings)


def _pod_namespace() -> str:
    """The namespace this pod runs in (its service account says), for discovery's default."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if not path.exists():
        raise ValueError("--engine-selector outside a pod needs --engine-namespace")
    return path.read_text().strip()


def _given(
    args: argparse.Namespace, prefix: str, fields: tuple[dataclasses.Field, ...]
) -> dict[str, Any]:
    """The settings among `fields` that flags named `prefix + field` gave (the rest default)."""
    given = {spec.name: getattr(args, prefix + spec.name, None) for spec in fields}
    return {name: value for name, value in given.items() if value is not None}


def _router(args: argparse.Namespace) -> None:
    from kvcache.core.secrets import curve_client_keys
    from kvcache.router.app import ProxySettings
    from kvcache.router.policy import EngineEvents, PolicySettings
    from kvcache.router.score import ScoreSettings
    from kvcache.router.serve import (
        ClusterSettings,
        PodDiscovery,
        RouterSettings,
        parse_named,
        serve,
    )

    try:
        engines = parse_named(args.engine, "engine")
        replays = parse_named(args.engine_replay, "replay endpoint")
        events = {
            name: EngineEvents(endpoint, replays.get(name))
            for name, endpoint in parse_named(args.engine_events, "events endpoint").items()
        }
        cluster = None
        if args.cluster_etcd or args.cluster_members:
            members = [
                Member(name, address)
                for name, address in parse_named(args.cluster_members, "member").items()
            ]
            cluster = ClusterSettings(
                etcd=args.cluster_etcd or "",
                name=args.cluster,
                members=tuple(members),
                lookup_budget_s=args.cluster_lookup_budget_ms / 1e3,
                curve=curve_client_keys(None, None),  # KVCACHE_CURVE_SERVER_KEY, ...
            )
        discovery = None
        if args.engine_selector:
            namespaces = tuple(args.engine_namespace) or (_pod_namespace(),)
            discovery = PodDiscovery(args.engine_selector, namespaces)
        settings = RouterSettings(
            discovery=discovery,
            engines=engines,
            events=events,
            tokenizer=args.tokenizer,
            policy=PolicySettings(
                block_size=args.block_size,
                hash_seed=args.hash_seed,
                score=ScoreSettings(**_given(args, "score_", dataclasses.fields(ScoreSettings))),
                **{
                    name: value
                    for name in ("speculative_ttl_s", "history_ttl_s", "index_capacity_blocks")
                    if (value := getattr(args, name)) is not None
                },
            ),
            cluster=cluster,
            tenant_salt=args.tenant_salt,
            proxy=ProxySettings(**_given(args, "", dataclasses.fields(ProxySettings))),
        )
    except ValueError as error:
        sys.exit(f"kvcache router: {error}")
    serve(settings, args.host, args.port, args.log_level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    node = commands.add_parser("node", help="run one cache node in this process")
    node.add_argument("--node-id", required=True, help="unique name of this node in its cluster")
    node.add_argument("--host", default="127.0.0.1", help="interface for both ports")
    node.add_argument("--port", type=int, default=7400, help="ZeroMQ data port")
    node.add_argument("--admin-port", type=int, default=7401, help="admin HTTP port")
    node.add_argument(
        "--memory", type=parse_bytes, default="1Gi", help="memory tier budget, e.g. 512Mi, 64Gi"
    )
    node.add_argument(
        "--eviction",
        default="prefix",
        choices=["prefix", "lru"],
        help="what a full tier gives up first: deep and cold chunks (prefix) or the oldest (lru)",
    )
    node.add_argument("--disk-dir", default=None, help="disk tier directory (default: none)")
    node.add_argument("--disk", type=parse_bytes, default="0", help="disk tier budget, e.g. 100Gi")
    node.add_argument(
        "--at-rest-key-file",
        default=_env("KVCACHE_AT_REST_KEY_FILE"),
        help="file with a 64-hex-character AES-256-GCM key: encrypts the disk tier "
        "(or KVCACHE_AT_REST_KEY)",
    )
    node.add_argument(
        "--curve-key-file",
        default=_env("KVCACHE_CURVE_KEY_FILE"),
        help="CurveZMQ secret certificate of this node: encrypts and authenticates clients "
        "(or KVCACHE_CURVE_PUBLIC_KEY and KVCACHE_CURVE_SECRET_KEY)",
    )
    node.add_argument(
        "--curve-allowed-clients",
        default=_env("KVCACHE_CURVE_ALLOWED_CLIENTS_DIR"),
        help="directory of client public certificates let in (or KVCACHE_CURVE_ALLOWED_CLIENTS)",
    )
    node.add_argument(
        "--etcd",
        default=_env("KVCACHE_ETCD"),
        help="etcd host:port to join (or KVCACHE_ETCD)",
    )
    node.add_argument(
        "--cluster", default=_env("KVCACHE_CLUSTER", "default"), help="cluster name in etcd"
    )
    node.add_argument("--lease-ttl", type=int, default=5, help="etcd lease TTL in seconds")
    node.add_argument("--zone", default=_env("KVCACHE_ZONE", ""), help="failure zone of this node")
    node.add_argument("--weight", type=float, default=1.0, help="ring share relative to others")
    node.add_argument(
        "--advertise",
        default=_env("KVCACHE_ADVERTISE"),
        help="address clients connect to (default tcp://HOST:PORT)",
    )
    node.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    node.set_defaults(run=_node)

    router = commands.add_parser("router", help="the prefix-aware OpenAI-API router")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8080)
    router.add_argument(
        "--engine", action="append", default=[], help="NAME=URL of an engine (repeat)"
    )
    router.add_argument(
        "--engine-selector",
        help="find engines as the ready pods with these labels (k=v,...; Kubernetes API)",
    )
    router.add_argument(
        "--engine-namespace", action="append", default=[], help="namespace to find engines in"
    )
    router.add_argument(
        "--engine-events", action="append", default=[], help="NAME=tcp://host:port KV events"
    )
    router.add_argument(
        "--engine-replay", action="append", default=[], help="NAME=tcp://host:port event replay"
    )
    router.add_argument("--tokenizer", help="the served model's tokenizer (directory)")
    router.add_argument("--block-size", type=int, default=16, help="the engines' KV block size")
    router.add_argument("--hash-seed", default="0", help="the engines' PYTHONHASHSEED")
    router.add_argument("--cluster-etcd", default=_env("KVCACHE_ETCD"), help="etcd host:port")
    router.add_argument("--cluster", default=_env("KVCACHE_CLUSTER", "default"))
    router.add_argument(
        "--cluster-members", action="append", default=[], help="NAME=tcp://host:port (repeat)"
    )
    router.add_argument(
        "--tenant-salt", default=_env("KVCACHE_TENANT_SALT", ""),
        help="the chunk-key salt of the --engine engines (discovered pods carry their own)",
    )  # fmt: skip
    router.add_argument(
        "--speculative-ttl-s", type=float,
        help="how long a routed prefix counts on an engine before its KV events confirm it (5)",
    )  # fmt: skip
    router.add_argument(
        "--history-ttl-s", type=float,
        help="how long a routed prefix counts where no KV event will confirm it (text mode, "
        "engines without events; 300)",
    )  # fmt: skip
    router.add_argument(
        "--index-capacity-blocks", type=int, help="prefix index entries per engine (65536)",
    )  # fmt: skip
    from kvcache.router.score import ScoreSettings  # pure: no sockets, no third-party imports

    for spec in dataclasses.fields(ScoreSettings):
        router.add_argument(
            f"--score-{spec.name.replace('_', '-')}", dest=f"score_{spec.name}",
            type=float if spec.type == "float" else int,
            help=f"the routing score's {spec.name} ({spec.default}; kvcache.router.score)",
        )  # fmt: skip
    router.add_argument(
        "--first-byte-timeout-s",
        type=float,
        help="give an engine up past this wait for its first byte (600)",
    )
    router.add_argument(
        "--idle-timeout-s",
        type=float,
        help="drop an engine that sends nothing this long mid-answer (120)",
    )
    router.add_argument("--max-body-bytes", type=parse_bytes,
                        help="refuse request bodies over this size (32Mi)")  # fmt: skip
    router.add_argument(
        "--cluster-lookup-budget-ms", type=float, default=20.0,
        help="the longest a request waits for the cluster's answer before it is routed without",
    )  # fmt: skip
    router.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    router.set_defaults(run=_router)

    up = commands.add_parser(
        "up", help="a local cluster of node processes and two engines serving the real model on it"
    )
    up.add_argument("--nodes", type=int, default=3, help="how many cache node processes")
    up.add_argument("--memory", type=parse_bytes, default="1Gi", help="memory budget of each node")
    up.add_argument(
        "--etcd", action="store_true", help="start a local etcd; nodes register, the client watches"
    )
    up.add_argument("--replicas", type=int, default=1, help="copies of each chunk (distinct nodes)")
    up.add_argument(
        "--codec", default="int8", choices=["none", "int8", "cachegen"], help="KV compression"
    )
    up.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated per request")
    up.add_argument("--requests", type=int, default=None, help="serve only the first N requests")
    up.add_argument(
        "--kill-cluster-after",
        type=int,
        default=None,
        metavar="N",
        help="stop every cache node after N requests; the rest are served without the cluster",
    )
    up.add_argument(
        "--local-memory",
        type=parse_bytes,
        default="2Gi",
        help="each engine's local tier (0: every hit comes over the network)",
    )
    up.set_defaults(run=_up)

    keys = commands.add_parser(
        "keys", help="make a CurveZMQ key pair: NAME.key (public) and NAME.key_secret"
    )
    keys.add_argument("name", help="file name stem, e.g. node or client-vllm")
    keys.add_argument("--dir", default=".", help="directory to write the two certificates to")
    keys.set_defaults(run=_keys)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
