"""One cache node process: its tiers (memory, and disk when configured), the ZeroMQ front and the
admin HTTP server on one asyncio loop, with a graceful stop on SIGTERM or SIGINT (readiness drops
first, then the fronts close, then the process exits 0)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

import uvicorn
import zmq

from kvcache.cachenode.admin import create_admin_app
from kvcache.cachenode.at_rest import AtRestCipher
from kvcache.cachenode.disk_tier import DiskTier
from kvcache.cachenode.eviction import make_policy
from kvcache.cachenode.handler import RequestHandler
from kvcache.cachenode.membership import MemberRegistration
from kvcache.cachenode.memory_tier import MemoryTier
from kvcache.cachenode.server import ZmqFront
from kvcache.cachenode.stats import NodeCollector, NodeStats
from kvcache.cachenode.tiered_store import TieredStore
from kvcache.core.allocator import release_free_pages, retain_freed_buffers
from kvcache.core.config import NodeConfig
from kvcache.core.membership import MemberRecord

log = logging.getLogger(__name__)

RELEASE_EVERY_S = 1.0  # how often freed memory beyond the retained share goes back to the kernel


class _AdminServer(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns SIGTERM and stops both fronts."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


class CacheNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.tier = MemoryTier(config.memory_bytes, make_policy(config.eviction))
        self.store = TieredStore(self.tier, _disk_tier(config))  # rebuilds the disk index
        self.stats = NodeStats()
        self.handler = RequestHandler(config.node_id, self.store, self.stats, config.limits)
        self.ready = False
        self.front: ZmqFront | None = None

    def snapshot(self) -> dict:
        snapshot = self.stats.snapshot(self.config.node_id, self.store)
        if self.front is not None and self.front.allow_list is not None:
            snapshot["curve_denied"] = self.front.auth_denied  # only nodes with an allow-list
        return snapshot

    def _registration(self) -> MemberRegistration | None:
        config = self.config
        if config.etcd is None:
            return None
        record = MemberRecord(
            node_id=config.node_id,
            address=config.public_address,
            zone=config.zone,
            weight=config.weight,
            memory_bytes=config.memory_bytes,
            disk_bytes=config.disk_bytes,
        )
        return MemberRegistration(config.etcd, record)

    async def run(self, stop: asyncio.Event) -> None:
        context = zmq.Context()
        front = self.front = ZmqFront(context, self.config.address, self.handler, self.config.curve)
        app = create_admin_app(
            NodeCollector(
                self.config.node_id,
                self.stats,
                self.store,
                (lambda: front.auth_denied) if front.allow_list is not None else None,
            ),
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
        registration = self._registration()
        keepalive = asyncio.create_task(registration.run()) if registration else None
        await stop.wait()
        self.ready = False
        if registration is not None and keepalive is not None:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)
            await registration.leave()  # clients drop this node now, before its front closes
        serving.cancel()
        admin.should_exit = True
        await asyncio.gather(serving, admin_task, return_exceptions=True)
        context.term()
        self.store.close()


def _disk_tier(config: NodeConfig) -> DiskTier | None:
    """The disk tier the config asks for, with its own instance of the eviction policy."""
    if config.disk_dir is None:
        return None
    if config.disk_bytes <= 0:
        raise ValueError("a disk tier needs a budget: give --disk (e.g. 100Gi) with --disk-dir")
    cipher = AtRestCipher(config.at_rest_key) if config.at_rest_key is not None else None
    return DiskTier(config.disk_dir, config.disk_bytes, make_policy(config.eviction), cipher)


async def _release_free_pages(keep_bytes: int) -> None:
    """Keeps the RSS near what the node holds: message parts freed between live values would
    otherwise stay resident for good (measured: +8 MiB over a 32 MiB budget under fuzzing).
    The trim runs in a worker thread (ctypes drops the GIL): after a mass delete it returns GiBs
    to the kernel, which took 187 ms for 3 GiB here, and must not stall the request loop."""
    while True:
        await asyncio.sleep(RELEASE_EVERY_S)
        await asyncio.to_thread(release_free_pages, keep_bytes)


def run_node(config: NodeConfig, log_level: str = "INFO") -> None:
    """Run a node in this process until SIGTERM or SIGINT."""

    # Freed buffers kept mapped count against the node's memory like anything it holds: at most
    # 5% of the budget, so a burst of traffic is not remembered as RSS the budget never allowed.
    retain = min(config.retain_freed_bytes, config.memory_bytes // 20)
    retain_freed_buffers(config.limits.max_message_part, retain)

    async def main(node: CacheNode) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        releasing = asyncio.create_task(_release_free_pages(retain))
        await node.run(stop)
        releasing.cancel()

    logging.basicConfig(level=log_level, stream=sys.stderr, format="%(asctime)s %(message)s")
    try:
        node = CacheNode(config)  # opens the disk tier: its directory, its lock, its index
    except (OSError, ValueError, RuntimeError) as error:
        sys.exit(f"kvcache node: {error}")
    asyncio.run(main(node))
