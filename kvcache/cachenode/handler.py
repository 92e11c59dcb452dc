"""Turns one received request into one reply, over the node's tiers. No sockets here.

receive frames -> parse and validate the whole header -> act on the store -> reply frames.
Nothing a client sends may crash the node: every protocol violation becomes an error reply with
its code, and anything unexpected becomes an `internal` error reply and a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from kvcache.cachenode.memory_tier import MemoryTier
from kvcache.cachenode.stats import NodeStats
from kvcache.cachenode.tiered_store import TieredStore
from kvcache.core.errors import ErrorCode, ProtocolError
from kvcache.core.protocol import (
    DEFAULT_LIMITS,
    Limits,
    Op,
    Reply,
    Request,
    ValueInfo,
    error_reply,
    parse_request,
    peek_id,
)

log = logging.getLogger(__name__)

# Parts below this size are copied out of libzmq's buffers: small received parts can share one
# read buffer, and keeping them would pin that whole buffer for as long as the value lives.
COPY_BELOW_BYTES = 64 << 10


class RequestHandler:
    def __init__(
        self,
        node_id: str,
        store: TieredStore | MemoryTier,
        stats: NodeStats,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        """A bare memory tier is served as a store without a disk tier."""
        self.node_id = node_id
        self.store = store if isinstance(store, TieredStore) else TieredStore(store)
        self.stats = stats
        self.limits = limits

    def handle(self, parts: Sequence[Any]) -> list[Any]:
        """`parts` is a request without its routing identity: header, then payload frames.

        Returns the reply's parts: header, then payload frames (GET only)."""
        if not parts:
            return self._error(None, ProtocolError(ErrorCode.MALFORMED_HEADER, "empty message"))
        header, payload = parts[0], parts[1:]
        try:
            request = parse_request(header, [len(frame) for frame in payload], self.limits)
        except ProtocolError as error:
            return self._error(peek_id(header, self.limits), error)
        self.stats.requests[request.op] += 1
        try:
            reply, frames = self._dispatch(request, payload)
        except Exception:
            log.exception("request %s %d failed", request.op, request.id)
            internal = ProtocolError(ErrorCode.INTERNAL, "the node failed to serve this request")
            return self._error(request.id, internal)
        return [reply.encode(), *frames]

    def _error(self, request_id: int | None, error: ProtocolError) -> list[Any]:
        self.stats.errors[error.code] += 1
        return [error_reply(request_id, error).encode()]

    def _dispatch(self, request: Request, payload: Sequence[Any]) -> tuple[Reply, list[Any]]:
        match request.op:
            case Op.PUT:
                return Reply(id=request.id, flags=self._put(request, payload)), []
            case Op.GET:
                return self._get(request)
            case Op.CONTAINS:
                return Reply(id=request.id, flags=[key in self.store for key in request.keys]), []
            case Op.DELETE:
                return Reply(id=request.id, flags=[self.store.delete(k) for k in request.keys]), []
            case Op.STATS:
                return Reply(id=request.id, stats=self.stats.snapshot(self.node_id, self.store)), []
            case Op.PING:
                return Reply(id=request.id), []
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unhandled op {request.op}")

    def _put(self, request: Request, payload: Sequence[Any]) -> list[bool]:
        stored: list[bool] = []
        position = 0
        for key, info in zip(request.keys, request.values):
            frames = payload[position : position + info.frames]
            position += info.frames
            if info.size < COPY_BELOW_BYTES and info.frames:
                frames = [b"".join(bytes(frame) for frame in frames)]
                info = replace(info, frames=1)
            elif any(len(frame) < COPY_BELOW_BYTES for frame in frames):
                # A large value sent in small parts would pin a read buffer and a zmq.Frame
                # per part, far over the per-frame charge: its small parts are copied out.
                frames = [f if len(f) >= COPY_BELOW_BYTES else bytes(f) for f in frames]
            accepted = self.store.put(key, frames, info)
            if accepted:
                self.stats.bytes_received += info.size
            else:
                self.stats.rejected += 1
            stored.append(accepted)
        return stored

    def _get(self, request: Request) -> tuple[Reply, list[Any]]:
        """Found values, up to max_request_bytes in one reply: keys beyond that are answered as
        misses, so one GET of thousands of large keys cannot tie up the node's sending."""
        values: list[ValueInfo | None] = []
        frames: list[Any] = []
        budget = self.limits.max_request_bytes
        for key in request.keys:
            value = self.store.get(key)
            if value is None or value.info.size > budget:
                self.stats.misses += 1
                values.append(None)
                continue
            budget -= value.info.size
            self.stats.hits += 1
            self.stats.bytes_sent += value.info.size
            values.append(value.info)
            frames.extend(value.frames)
        return Reply(id=request.id, values=values), frames
