"""Where a client's ring comes from: a static member list, or etcd watched in the background.

Both sources answer `current()` with an immutable `RingView`, swapped atomically as a whole, so a
client thread reads it without a lock and never sees half an update. `EtcdMembership` lists the
cluster's member prefix, builds the ring at that revision, then watches from the next revision so
no change is missed between the two; every change builds a new ring whose epoch is the etcd
revision it reflects. When etcd is unreachable the last view stays in use (the nodes themselves
still serve) and the watcher reconnects and lists again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

import aetcd

from kvcache.core.config import EtcdConfig
from kvcache.core.membership import MemberRecord, RingView, members_prefix
from kvcache.core.ring import HashRing, Member

log = logging.getLogger(__name__)

RECONNECT_S = 0.5  # first retry after etcd failed; doubles per failure up to RECONNECT_MAX_S
RECONNECT_MAX_S = 5.0


class MembershipSource(Protocol):
    def current(self) -> RingView: ...

    def close(self) -> None: ...


class StaticMembership:
    """A fixed member list, for local runs without etcd: epoch 0 forever."""

    def __init__(self, members: Iterable[Member]) -> None:
        self._view = RingView(0, HashRing(members))

    def current(self) -> RingView:
        return self._view

    def close(self) -> None:
        pass


class EtcdMembership:
    """The members registered under `/kvcache/<cluster>/members/`, followed by a watch.

    `subscribe(callback)` calls `callback(view)` from the watcher thread after every change (keep
    it short: the next change waits for it)."""

    def __init__(self, etcd: EtcdConfig) -> None:
        self.etcd = etcd
        self._prefix = members_prefix(etcd.cluster)
        self._view = RingView(0, HashRing([]))
        self._records: dict[str, MemberRecord] = {}
        self._changed = threading.Condition()
        self._callbacks: list[Callable[[RingView], None]] = []
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._listed = False  # set by each successful listing: the next failure retries soon
        self._thread = threading.Thread(
            target=self._loop.run_until_complete,
            args=(self._follow(),),
            name=f"etcd-membership-{etcd.cluster}",
            daemon=True,
        )
        self._thread.start()

    def current(self) -> RingView:
        return self._view

    def subscribe(self, callback: Callable[[RingView], None]) -> None:
        self._callbacks.append(callback)

    def wait_for(self, predicate: Callable[[RingView], bool], timeout_s: float) -> RingView | None:
        """Block until the view satisfies `predicate`; the view, or None after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not predicate(self._view):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._view

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    # ---- the watcher thread ---------------------------------------------------------------

    async def _follow(self) -> None:
        stopping = asyncio.create_task(self._stopping.wait())
        delay = RECONNECT_S
        while not self._stopping.is_set():
            following = asyncio.create_task(self._list_and_watch())
            await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
            try:
                await following
            except asyncio.CancelledError:
                pass
            except Exception as error:  # etcd down or restarting: keep the last view, retry
                log.warning("etcd membership watch of %s: %s", self.etcd.cluster, error)
            if self._listed:
                delay, self._listed = RECONNECT_S, False
            if not self._stopping.is_set():
                await asyncio.wait({stopping}, timeout=delay)
                delay = min(2 * delay, RECONNECT_MAX_S)

    async def _list_and_watch(self) -> None:
        host, port = self.etcd.host_port
        client = aetcd.Client(host=host, port=port)
        try:
            listing = await client.get_prefix(self._prefix)
            self._records = {}
            for kv in listing:
                self._apply_put(kv.key, kv.value)
            revision = listing.header.revision
            self._publish(revision)
            self._listed = True
            watch = await client.watch_prefix(self._prefix, start_revision=revision + 1)
            async for event in watch:
                if event.kind == aetcd.EventKind.PUT:
                    self._apply_put(event.kv.key, event.kv.value)
                else:
                    self._records.pop(self._node_id(event.kv.key), None)
                self._publish(event.kv.mod_revision)
        finally:
            try:
                await client.close()
            except Exception as error:  # a channel that broke may fail to close; it is gone
                log.debug("closing etcd client: %s", error)

    def _node_id(self, key: bytes) -> str:
        return key[len(self._prefix) :].decode(errors="replace")

    def _apply_put(self, key: bytes, value: bytes) -> None:
        node_id = self._node_id(key)
        try:
            record = MemberRecord.decode(value)
        except ValueError as error:
            log.warning("ignoring member %s: %s", node_id, error)
            self._records.pop(node_id, None)
            return
        if record.node_id != node_id:
            log.warning("ignoring member %s: its record names %s", node_id, record.node_id)
            self._records.pop(node_id, None)
            return
        self._records[node_id] = record

    def _publish(self, epoch: int) -> None:
        view = RingView.of(epoch, self._records.values())
        with self._changed:
            self._view = view
            self._changed.notify_all()
        for callback in self._callbacks:
            callback(view)
