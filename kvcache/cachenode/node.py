"""One cache node process: the memory tier, the ZeroMQ front and the admin HTTP server on one
asyncio loop, with a graceful stop on SIGTERM or SIGINT (readiness drops first, then the fronts
close, then the process exits 0)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn
import zmq

from kvcache.cachenode.admin import create_admin_app
from kvcache.cachenode.handler import RequestHandler
from kvcache.cachenode.memory_tier import MemoryTier
from kvcache.cachenode.server import ZmqFront
from kvcache.cachenode.stats import NodeCollector, NodeStats
from kvcache.core.allocator import retain_freed_buffers
from kvcache.core.config import NodeConfig

log = logging.getLogger(__name__)


class _AdminServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGTERM and stops both fronts."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


class CacheNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.tier = MemoryTier(config.memory_bytes)
        self.stats = NodeStats()
        self.handler = RequestHandler(config.node_id, self.tier, self.stats, config.limits)
        self.ready = False

    def snapshot(self) -> dict:
        return self.stats.snapshot(self.config.node_id, self.tier)

    async def run(self, stop: asyncio.Event) -> None:
        context = zmq.Context()
        front = ZmqFront(context, self.config.address, self.handler)
        app = create_admin_app(
            NodeCollector(self.config.node_id, self.stats, self.tier),
            self.snapshot,
            lambda: self.ready,
        )
        admin = _AdminServer(
            uvicorn.Config(
                app,
                host=self.config.host,
                port=self.config.admin_port,
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
        )
        serving = asyncio.create_task(front.serve())
        admin_task = asyncio.create_task(admin.serve())
        self.ready = True
        log.info("node %s serving %s", self.config.node_id, front.address)
        await stop.wait()
        self.ready = False
        serving.cancel()
        admin.should_exit = True
        await asyncio.gather(serving, admin_task, return_exceptions=True)
        context.term()


def run_node(config: NodeConfig, log_level: str = "INFO") -> None:
    """Run a node in this process until SIGTERM or SIGINT."""

    retain_freed_buffers(config.limits.max_message_part, config.retain_freed_bytes)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await CacheNode(config).run(stop)

    logging.basicConfig(level=log_level, stream=sys.stderr, format="%(asctime)s %(message)s")
    asyncio.run(main())
