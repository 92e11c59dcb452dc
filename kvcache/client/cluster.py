"""The cluster client: batched put/get/contains/delete and longest-prefix lookup over the ring.

A call groups its keys by owning node, cuts each group into requests (by bytes for PUT, by key
count otherwise), and keeps up to `window` requests in flight per node, all nodes at once, from one
thread with one poller: no thread per node, and acknowledgements never stall the pipe.

What the caller can rely on: a dead, slow or misbehaving node costs misses (False / None), never an
exception; a value whose checksum does not match is a miss and a counter, never returned. Arguments
that break the protocol (a key that is not 32 bytes, a value over the size limit) raise ValueError
before anything is sent. Not thread-safe: give each thread its own client.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import zmq

from kvcache.client.transport import NodeConnection
from kvcache.client.value import Value
from kvcache.core.allocator import retain_freed_buffers
from kvcache.core.checksum import checksum
from kvcache.core.config import ClientConfig
from kvcache.core.errors import ProtocolError
from kvcache.core.protocol import (
    KEY_BYTES,
    Op,
    Reply,
    Request,
    ValueInfo,
    check_meta,
    decode_header,
    frames_needed,
    parse_reply,
)
from kvcache.core.ring import HashRing, Member


@dataclass
class ClientStats:
    """What went wrong, counted: each of these turned into misses for the caller."""

    checksum_mismatches: int = 0
    timeouts: int = 0
    skipped_down: int = 0
    bad_replies: int = 0
    node_errors: Counter[str] = field(default_factory=Counter)


@dataclass
class _Call:
    """One request to one node, with the positions of its keys in the caller's list."""

    node_id: str
    request: Request
    positions: list[int]
    # PUT only: values and their metas, checksummed and split just before the request is sent,
    # so hashing one request overlaps with libzmq sending the previous ones.
    values: list[tuple[memoryview, dict[str, Any]]] = field(default_factory=list)
    parts: list[Any] | None = None  # built once, kept while the node cannot take them yet
    reply: Reply | None = None
    found: list[Value | None] = field(default_factory=list)  # GET: verified as replies arrive
    sent_at: float = 0.0


class ClusterClient:
    def __init__(self, members: Sequence[Member], config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig()
        retain_freed_buffers(self.config.limits.max_frame_bytes, self.config.retain_freed_bytes)
        self.ring = HashRing(members)
        self.stats = ClientStats()
        self._context = zmq.Context()
        self._connections = {
            member.node_id: NodeConnection(
                self._context, member.address, self.config.limits, self.config.curve
            )
            for member in self.ring.members
        }
        self._down_until: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._typical_value_bytes = 256 << 10  # sizes GET requests; follows what GETs return

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._context.term()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the operations -------------------------------------------------------------------

    def put(
        self,
        keys: Sequence[bytes],
        values: Sequence[Any],
        metas: Sequence[dict[str, Any]] | None = None,
    ) -> list[bool]:
        """Store values (anything with the buffer protocol) under keys; True where stored."""
        if len(values) != len(keys) or (metas is not None and len(metas) != len(keys)):
            raise ValueError("put needs one value (and one meta, if given) per key")
        self._check_keys(keys)
        views = [memoryview(value).cast("B") for value in values]
        metas = metas if metas is not None else [{} for _ in keys]
        limits = self.config.limits
        for index, (view, meta) in enumerate(zip(views, metas)):
            if view.nbytes > limits.max_value_bytes:
                raise ValueError(
                    f"value {index} is {view.nbytes} bytes, limit {limits.max_value_bytes}"
                )
            try:
                check_meta(meta, limits, f"value {index}")
            except ProtocolError as error:
                raise ValueError(error.message) from None
        calls = []
        for node_id, positions in self.ring.group_by_primary(keys).items():
            for batch in self._put_batches(positions, views):
                request = Request(Op.PUT, next(self._ids), [keys[p] for p in batch])
                batch_values = [(views[p], metas[p]) for p in batch]
                calls.append(_Call(node_id, request, batch, batch_values))
        self._execute(calls)
        return self._flags(calls, len(keys))

    def get(self, keys: Sequence[bytes]) -> list[Value | None]:
        """Values for keys, verified against their checksums; None for every miss."""
        self._check_keys(keys)
        batch_keys = self.config.get_batch_bytes // self._typical_value_bytes
        calls = self._keyed_calls(
            Op.GET, keys, min(max(1, batch_keys), self.config.limits.max_keys)
        )
        self._execute(calls)
        found: list[Value | None] = [None] * len(keys)
        for call in calls:
            for position, value in zip(call.positions, call.found):
                found[position] = value
        sizes = [value.size for value in found if value is not None]
        if sizes:
            self._typical_value_bytes = max(
                1, (self._typical_value_bytes + sum(sizes) // len(sizes)) // 2
            )
        return found

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_keys(keys)
        calls = self._keyed_calls(Op.CONTAINS, keys, self.config.limits.max_keys)
        self._execute(calls)
        return self._flags(calls, len(keys))

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys of a prefix chain are cached (one parallel CONTAINS round)."""
        present = self.contains(keys)
        return next((index for index, hit in enumerate(present) if not hit), len(keys))

    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        self._check_keys(keys)
        calls = self._keyed_calls(Op.DELETE, keys, self.config.limits.max_keys)
        self._execute(calls)
        return self._flags(calls, len(keys))

    def node_stats(self) -> dict[str, dict[str, Any] | None]:
        """Each node's counters, None for a node that did not answer."""
        calls = [
            _Call(node_id, Request(Op.STATS, next(self._ids)), []) for node_id in self._connections
        ]
        self._execute(calls)
        return {call.node_id: call.reply.stats if call.reply else None for call in calls}

    def ping(self) -> dict[str, bool]:
        calls = [
            _Call(node_id, Request(Op.PING, next(self._ids)), []) for node_id in self._connections
        ]
        self._execute(calls)
        return {call.node_id: call.reply is not None for call in calls}

    # ---- request building -----------------------------------------------------------------

    def _check_keys(self, keys: Sequence[bytes]) -> None:
        if all(type(key) is bytes and len(key) == KEY_BYTES for key in keys):
            return
        bad = next(i for i, k in enumerate(keys) if type(k) is not bytes or len(k) != KEY_BYTES)
        raise ValueError(f"key {bad} must be {KEY_BYTES} bytes")

    def _keyed_calls(self, op: Op, keys: Sequence[bytes], batch_keys: int) -> list[_Call]:
        calls = []
        for node_id, positions in self.ring.group_by_primary(keys).items():
            for start in range(0, len(positions), batch_keys):
                batch = positions[start : start + batch_keys]
                request = Request(op, next(self._ids), [keys[p] for p in batch])
                calls.append(_Call(node_id, request, batch))
        return calls

    def _put_batches(self, positions: list[int], views: list[memoryview]) -> Iterator[list[int]]:
        """Cut one node's values into requests of about `put_batch_bytes` each."""
        limits = self.config.limits
        batch: list[int] = []
        batch_bytes = 0
        for position in positions:
            size = views[position].nbytes
            full = batch_bytes + size > self.config.put_batch_bytes
            if batch and (full or len(batch) == limits.max_keys):
                yield batch
                batch, batch_bytes = [], 0
            batch.append(position)
            batch_bytes += size
        if batch:
            yield batch

    def _parts(self, call: _Call) -> list[Any]:
        """The message parts of a call: its header, then (PUT) every value's frames."""
        if call.request.op is not Op.PUT:
            return [call.request.encode()]
        infos, payload = [], []
        for view, meta in call.values:
            frames = self._split(view)
            infos.append(ValueInfo(view.nbytes, len(frames), checksum([view]), meta))
            payload.extend(frames)
        return [replace(call.request, values=infos).encode(), *payload]

    def _split(self, view: memoryview) -> list[memoryview]:
        step = self.config.frame_bytes
        count = frames_needed(view.nbytes, step)
        return [view[index * step : (index + 1) * step] for index in range(count)]

    @staticmethod
    def _flags(calls: list[_Call], count: int) -> list[bool]:
        flags = [False] * count
        for call in calls:
            if call.reply is not None:
                for position, flag in zip(call.positions, call.reply.flags):
                    flags[position] = flag
        return flags

    # ---- sending and receiving ------------------------------------------------------------

    def _execute(self, calls: list[_Call]) -> None:
        """Run calls to completion: each ends with a reply, or without one when its node failed."""
        now = time.monotonic()
        queued: dict[str, deque[_Call]] = {}
        for call in calls:
            if self._down_until.get(call.node_id, 0.0) > now:
                self.stats.skipped_down += 1
                continue
            queued.setdefault(call.node_id, deque()).append(call)
        in_flight: dict[str, dict[int, _Call]] = {node_id: {} for node_id in queued}
        blocked_since: dict[str, float] = {}
        by_socket = {self._connections[n].socket: n for n in queued}
        poller = zmq.Poller()
        for socket in by_socket:
            poller.register(socket, zmq.POLLIN)
        timeout = self.config.timeout_s
        while any(queued.values()) or any(in_flight.values()):
            now = time.monotonic()
            for node_id, queue in queued.items():
                self._send_ready(node_id, queue, in_flight[node_id], blocked_since, now, poller)
            deadline = min(
                [c.sent_at + timeout for flight in in_flight.values() for c in flight.values()]
                + [since + timeout for since in blocked_since.values()]
            )
            wait_ms = max(0.0, (deadline - time.monotonic()) * 1000)
            for socket, _ in poller.poll(wait_ms):
                node_id = by_socket[socket]
                self._receive_ready(node_id, in_flight[node_id])
            now = time.monotonic()
            for node_id in list(queued):
                flight = in_flight[node_id]
                oldest = min((call.sent_at for call in flight.values()), default=None)
                since = blocked_since.get(node_id)
                if (oldest is not None and now - oldest > timeout) or (
                    since is not None and now - since > timeout
                ):
                    self._fail_node(node_id, poller)
                    queued[node_id].clear()
                    flight.clear()
                    blocked_since.pop(node_id, None)

    def _send_ready(
        self,
        node_id: str,
        queue: deque[_Call],
        flight: dict[int, _Call],
        blocked_since: dict[str, float],
        now: float,
        poller: zmq.Poller,
    ) -> None:
        connection = self._connections[node_id]
        while queue and len(flight) < self.config.window:
            call = queue[0]
            if call.parts is None:
                call.parts = self._parts(call)
            if not connection.try_send(call.parts):
                if node_id not in blocked_since:
                    blocked_since[node_id] = now
                    poller.register(connection.socket, zmq.POLLIN | zmq.POLLOUT)
                return
            queue.popleft()
            call.parts = None
            call.sent_at = now
            flight[call.request.id] = call
        if blocked_since.pop(node_id, None) is not None:
            poller.register(connection.socket, zmq.POLLIN)

    def _receive_ready(self, node_id: str, flight: dict[int, _Call]) -> None:
        connection = self._connections[node_id]
        while (parts := connection.try_receive()) is not None:
            if not parts:
                continue
            header, payload = parts[0], parts[1:]
            try:
                decoded = decode_header(header.buffer, self.config.limits)
            except ProtocolError:
                self.stats.bad_replies += 1  # unattributable: its call will time out
                continue
            reply_id = decoded.get("id")
            call = flight.pop(reply_id, None) if type(reply_id) is int else None
            if call is None:
                continue  # a reply to a request this client already gave up on
            try:
                reply = parse_reply(
                    decoded, [len(p) for p in payload], call.request, self.config.limits
                )
            except ProtocolError:
                self.stats.bad_replies += 1
                continue
            if not reply.ok:
                self.stats.node_errors[str(reply.code)] += 1
                continue
            call.reply = reply
            if call.request.op is Op.GET:
                call.found = self._verified(reply, payload)

    def _verified(self, reply: Reply, payload: list[zmq.Frame]) -> list[Value | None]:
        """A GET reply's values, checked against their checksums right as the reply arrives,
        while its frames are still in cache and the next replies are still on the wire."""
        found: list[Value | None] = []
        position = 0
        for info in reply.values:
            if info is None:
                found.append(None)
                continue
            buffers = tuple(frame.buffer for frame in payload[position : position + info.frames])
            position += info.frames
            if checksum(buffers) != info.checksum:
                self.stats.checksum_mismatches += 1
                found.append(None)
                continue
            found.append(Value(buffers, info.size, info.meta))
        return found

    def _fail_node(self, node_id: str, poller: zmq.Poller) -> None:
        """A node that timed out: forget what is queued to it and skip it for a while."""
        self.stats.timeouts += 1
        connection = self._connections[node_id]
        poller.unregister(connection.socket)
        connection.reset()
        self._down_until[node_id] = time.monotonic() + self.config.down_backoff_s
