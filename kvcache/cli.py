"""The one `kvcache` command: `node` runs a cache node, `up` runs a local cluster and its demo."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kvcache.core.config import NodeConfig, parse_bytes


def _node(args: argparse.Namespace) -> None:
    from kvcache.cachenode.node import run_node

    config = NodeConfig(
        node_id=args.node_id,
        host=args.host,
        port=args.port,
        admin_port=args.admin_port,
        memory_bytes=args.memory,
    )
    run_node(config, log_level=args.log_level)


def _up(args: argparse.Namespace) -> None:
    from kvcache.up import run_local_demo

    run_local_demo(nodes=args.nodes, memory_bytes=args.memory, prompts=args.prompts)


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
    node.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    node.set_defaults(run=_node)

    up = commands.add_parser("up", help="a local cluster of node processes and a demo workload")
    up.add_argument("--nodes", type=int, default=3, help="how many cache node processes")
    up.add_argument("--memory", type=parse_bytes, default="1Gi", help="memory budget of each node")
    up.add_argument("--prompts", type=int, default=16, help="prompts in the demo workload")
    up.set_defaults(run=_up)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
