"""The cluster client: batched put/get/contains/delete and longest-prefix lookup over the ring.

A call groups its keys by owning node, cuts each group into requests (by bytes for PUT, by key
count otherwise), and keeps up to `window` requests in flight per node, all nodes at once, from one
thread with one poller: no thread per node, and acknowledgements never stall the pipe.

The ring comes from a `MembershipSource` (a static list, or etcd watched in the background) and is
picked up at the start of every call. With `replicas` R > 1 a PUT or DELETE goes to a key's R
owners; a GET or CONTAINS asks the first owner and falls through to the next owners for the keys
that missed or whose node failed. A GET that finds a value past the first owner writes it back to
the owners that answered without it (read-repair): after a node joins, it is filled with exactly
the chunks that are read again, and no bulk handoff competes with serving traffic.

What the caller can rely on: a dead, slow or misbehaving node costs misses (False / None), never an
exception; a value whose checksum does not match is a miss and a counter, never returned. Arguments
that break the protocol (a key that is not 32 bytes, a value over the size limit) raise ValueError
before anything is sent. Not thread-safe: give each thread its own client.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import zmq

from kvcache.client.membership import EtcdMembership, MembershipSource, StaticMembership
from kvcache.client.transport import NodeConnection
from kvcache.client.value import Value
from kvcache.core.allocator import retain_freed_buffers
from kvcache.core.checksum import checksum
from kvcache.core.config import ClientConfig, EtcdConfig
from kvcache.core.errors import ProtocolError
from kvcache.core.membership import RingView
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
    read_repairs: int = 0  # values written back to owners that missed them
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
    def __init__(
        self,
        members: Sequence[Member] | MembershipSource,
        config: ClientConfig | None = None,
        owns_membership: bool = False,
    ) -> None:
        """`members` is a static member list or a membership source (closed with the client
        when `owns_membership`)."""
        self.config = config or ClientConfig()
        if self.config.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.config.replicas}")
        retain_freed_buffers(self.config.limits.max_frame_bytes, self.config.retain_freed_bytes)
        if isinstance(members, Sequence):
            self._membership: MembershipSource = StaticMembership(members)
            owns_membership = True
        else:
            self._membership = members
        self._owns_membership = owns_membership
        self.stats = ClientStats()
        self._context = zmq.Context()
        self._view = RingView(-1, HashRing([]))
        self._connections: dict[str, NodeConnection] = {}
        self._down_until: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._typical_value_bytes = 256 << 10  # sizes GET requests; follows what GETs return
        self._sync_view()

    @classmethod
    def from_etcd(
        cls, etcd: EtcdConfig, config: ClientConfig | None = None, wait_s: float = 10.0
    ) -> ClusterClient:
        """A client whose ring follows the members registered in etcd; waits up to `wait_s` for
        the first member to appear (a client over an empty ring only misses)."""
        membership = EtcdMembership(etcd)
        membership.wait_for(lambda view: len(view.ring) > 0, wait_s)
        return cls(membership, config, owns_membership=True)

    @property
    def ring(self) -> HashRing:
        return self._view.ring

    @property
    def epoch(self) -> int:
        """The membership epoch of the ring the last call used (the etcd revision; 0 static)."""
        return self._view.epoch

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._context.term()
        if self._owns_membership:
            self._membership.close()

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
        self._sync_view()
        calls = self._put_calls(keys, self._placement(keys), views, metas)
        self._execute(calls)
        return self._flags(calls, len(keys))

    def get(self, keys: Sequence[bytes]) -> list[Value | None]:
        """Values for keys, verified against their checksums; None for every miss."""
        self._check_keys(keys)
        self._sync_view()
        batch_keys = self.config.get_batch_bytes // self._typical_value_bytes
        batch_keys = min(max(1, batch_keys), self.config.limits.max_keys)
        found: list[Value | None] = [None] * len(keys)
        missed_by: dict[int, list[str]] = {}  # position -> nodes that answered without it
        pending = list(range(len(keys)))
        for rank in range(self._replicas()):
            calls = self._ranked_calls(Op.GET, keys, pending, rank, batch_keys)
            self._execute(calls)
            for call in calls:
                if call.reply is None:
                    continue
                for position, value in zip(call.positions, call.found):
                    if value is None:
                        missed_by.setdefault(position, []).append(call.node_id)
                    else:
                        found[position] = value
            pending = [position for position in pending if found[position] is None]
            if not pending:
                break
        if self.config.read_repair and missed_by:
            self._repair(keys, found, missed_by)
        sizes = [value.size for value in found if value is not None]
        if sizes:
            self._typical_value_bytes = max(
                1, (self._typical_value_bytes + sum(sizes) // len(sizes)) // 2
            )
        return found

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        """Which keys are stored: first owners first, later owners for the keys that missed."""
        self._check_keys(keys)
        self._sync_view()
        present = [False] * len(keys)
        pending = list(range(len(keys)))
        batch_keys = self.config.limits.max_keys
        for rank in range(self._replicas()):
            calls = self._ranked_calls(Op.CONTAINS, keys, pending, rank, batch_keys)
            self._execute(calls)
            for call in calls:
                if call.reply is not None:
                    for position, flag in zip(call.positions, call.reply.flags):
                        present[position] = present[position] or flag
            pending = [position for position in pending if not present[position]]
            if not pending:
                break
        return present

    def lookup_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading keys of a prefix chain are cached (one parallel CONTAINS round)."""
        present = self.contains(keys)
        return next((index for index, hit in enumerate(present) if not hit), len(keys))

    def delete(self, keys: Sequence[bytes]) -> list[bool]:
        """Delete keys from all their owners; True where any owner held the key."""
        self._check_keys(keys)
        self._sync_view()
        calls = []
        for node_id, positions in self._placement(keys).items():
            for start in range(0, len(positions), self.config.limits.max_keys):
                batch = positions[start : start + self.config.limits.max_keys]
                request = Request(Op.DELETE, next(self._ids), [keys[p] for p in batch])
                calls.append(_Call(node_id, request, batch))
        self._execute(calls)
        return self._flags(calls, len(keys))

    def node_stats(self) -> dict[str, dict[str, Any] | None]:
        """Each node's counters, None for a node that did not answer."""
        self._sync_view()
        calls = [
            _Call(node_id, Request(Op.STATS, next(self._ids)), []) for node_id in self._connections
        ]
        self._execute(calls)
        return {call.node_id: call.reply.stats if call.reply else None for call in calls}

    def ping(self) -> dict[str, bool]:
        self._sync_view()
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

    def _sync_view(self) -> None:
        """Adopt the membership source's newest ring: connect to new members, drop gone ones."""
        view = self._membership.current()
        if view is self._view:
            return
        members = {member.node_id: member for member in view.ring.members}
        for node_id in list(self._connections):
            member = members.get(node_id)
            if member is None or member.address != self._connections[node_id].address:
                self._connections.pop(node_id).close()
                self._down_until.pop(node_id, None)
        for node_id, member in members.items():
            if node_id not in self._connections:
                self._connections[node_id] = NodeConnection(
                    self._context, member.address, self.config.limits, self.config.curve
                )
        self._view = view

    def _replicas(self) -> int:
        return max(1, min(self.config.replicas, len(self.ring)))

    def _placement(self, keys: Sequence[bytes]) -> dict[str, list[int]]:
        """Positions of `keys` grouped by every node that owns them (R owners per key)."""
        replicas = self._replicas()
        if replicas == 1:
            return self.ring.group_by_primary(keys)
        groups: dict[str, list[int]] = {}
        for position, key in enumerate(keys):
            for member in self.ring.owners(key, replicas):
                groups.setdefault(member.node_id, []).append(position)
        return groups

    def _at_rank(
        self, keys: Sequence[bytes], positions: list[int], rank: int
    ) -> dict[str, list[int]]:
        """`positions` grouped by the owner of rank `rank` (0: primary) of their keys."""
        if rank == 0:
            groups = self.ring.group_by_primary([keys[p] for p in positions])
            return {node: [positions[i] for i in indices] for node, indices in groups.items()}
        ranked: dict[str, list[int]] = {}
        for position in positions:
            owners = self.ring.owners(keys[position], rank + 1)
            if len(owners) > rank:
                ranked.setdefault(owners[rank].node_id, []).append(position)
        return ranked

    def _ranked_calls(
        self, op: Op, keys: Sequence[bytes], positions: list[int], rank: int, batch_keys: int
    ) -> list[_Call]:
        calls = []
        for node_id, group in self._at_rank(keys, positions, rank).items():
            for start in range(0, len(group), batch_keys):
                batch = group[start : start + batch_keys]
                request = Request(op, next(self._ids), [keys[p] for p in batch])
                calls.append(_Call(node_id, request, batch))
        return calls

    def _put_calls(
        self,
        keys: Sequence[bytes],
        placement: dict[str, list[int]],
        views: Mapping[int, memoryview] | Sequence[memoryview],
        metas: Mapping[int, dict[str, Any]] | Sequence[dict[str, Any]],
    ) -> list[_Call]:
        calls = []
        for node_id, positions in placement.items():
            for batch in self._put_batches(positions, views):
                request = Request(Op.PUT, next(self._ids), [keys[p] for p in batch])
                batch_values = [(views[p], metas[p]) for p in batch]
                calls.append(_Call(node_id, request, batch, batch_values))
        return calls

    def _repair(
        self, keys: Sequence[bytes], found: list[Value | None], missed_by: dict[int, list[str]]
    ) -> None:
        """Write values found at a later owner back to the earlier owners that answered without
        them (a node that joined, or one that evicted the value)."""
        placement: dict[str, list[int]] = {}
        views: dict[int, memoryview] = {}
        metas: dict[int, dict[str, Any]] = {}
        for position, nodes in missed_by.items():
            value = found[position]
            if value is None:
                continue
            views[position] = memoryview(
                value.frames[0] if len(value.frames) == 1 else bytes(value)
            ).cast("B")
            metas[position] = value.meta
            for node_id in nodes:
                placement.setdefault(node_id, []).append(position)
        if not placement:
            return
        calls = self._put_calls(keys, placement, views, metas)
        self._execute(calls)
        self.stats.read_repairs += sum(
            sum(call.reply.flags) for call in calls if call.reply is not None
        )

    def _put_batches(
        self, positions: list[int], views: Mapping[int, memoryview] | Sequence[memoryview]
    ) -> Iterator[list[int]]:
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
        """Per key, whether any call that carried it answered True."""
        flags = [False] * count
        for call in calls:
            if call.reply is not None:
                for position, flag in zip(call.positions, call.reply.flags):
                    flags[position] = flags[position] or flag
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
