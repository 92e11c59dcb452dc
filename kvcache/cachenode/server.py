"""The cache node's ZeroMQ front: a ROUTER socket served by one asyncio task.

Parts are received and sent with `copy=False`, so payloads move between libzmq's buffers and the
memory tier by reference. libzmq itself refuses any single part larger than the protocol allows
(ZMQ_MAXMSGSIZE), so a hostile size never reaches an allocation in Python.
"""

from __future__ import annotations

import logging

import zmq
import zmq.asyncio

from kvcache.cachenode.handler import RequestHandler

log = logging.getLogger(__name__)


class ZmqFront:
    def __init__(self, context: zmq.asyncio.Context, address: str, handler: RequestHandler) -> None:
        self.handler = handler
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, handler.limits.max_message_part)
        self.socket.setsockopt(zmq.RCVHWM, 64)
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.socket.bind(address)
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    async def serve(self) -> None:
        """Serve until cancelled. Handling is synchronous between two awaits, so cancellation
        lands while waiting for a request, never halfway through one."""
        try:
            while True:
                parts = await self.socket.recv_multipart(copy=False)
                reply = self.handler.handle(parts[1:])
                await self.socket.send_multipart([parts[0], *reply], copy=False)
        finally:
            self.socket.close(linger=0)
