"""The cache node's ZeroMQ front: a ROUTER socket drained by one asyncio task.

Parts are received and sent with `copy=False`, so payloads move between libzmq's buffers and the
memory tier by reference. libzmq itself refuses any single part larger than the protocol allows
(ZMQ_MAXMSGSIZE), so a hostile size never reaches an allocation in Python.

The event loop watches the socket's file descriptor and its callback serves every queued request
at once: one wake-up per burst, no future or task switch per message, which halves a round trip's
latency against zmq.asyncio. Replies never block: a ROUTER drops a reply to a peer that stopped
reading.

With CurveZMQ configured the ROUTER is a CURVE server: every connection is encrypted and proves it
knows the node's public key. An allow-list of client public keys is enforced through ZAP by
pyzmq's `ThreadAuthenticator`, which answers libzmq's handshake queries from its own thread, so
it needs nothing from the asyncio loop and costs nothing after a connection is up. A refused
client never completes its handshake: no request of it reaches the handler. Without an allow-list
no ZAP handler runs and libzmq admits any client that knows the node's public key.
"""

from __future__ import annotations

import asyncio

import zmq
from zmq.auth.thread import ThreadAuthenticator

from kvcache.cachenode.handler import RequestHandler
from kvcache.core.config import CurveServerKeys

DRAIN_BATCH = 64


class ClientAllowList:
    """The ZAP credentials provider of a CURVE node: admits the listed client public keys (Z85)
    and counts the handshakes it refuses. Called from the authenticator's thread."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys
        self.denied = 0

    def callback(self, domain: str, client_key: bytes) -> bool:
        if client_key in self.keys:
            return True
        self.denied += 1  # only this thread writes it; readers see a plain int
        return False


class ZmqFront:
    def __init__(
        self,
        context: zmq.Context,
        address: str,
        handler: RequestHandler,
        curve: CurveServerKeys | None = None,
    ) -> None:
        self.handler = handler
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, handler.limits.max_message_part)
        self.socket.setsockopt(zmq.RCVHWM, 64)
        self.socket.setsockopt(zmq.SNDHWM, 64)
        self.allow_list: ClientAllowList | None = None
        self._authenticator: ThreadAuthenticator | None = None
        if curve is not None:
            self._secure(context, curve)
        try:
            self.socket.bind(address)
        except zmq.ZMQError:
            self._close()
            raise
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def _secure(self, context: zmq.Context, curve: CurveServerKeys) -> None:
        """Make the socket a CURVE server, and start the ZAP handler before anything can connect
        so that no handshake slips through unchecked."""
        self.socket.curve_secretkey = curve.secret_key
        self.socket.curve_publickey = curve.public_key
        self.socket.curve_server = True
        if curve.allowed_clients is not None:
            self.allow_list = ClientAllowList(curve.allowed_clients)
            self._authenticator = ThreadAuthenticator(context)
            self._authenticator.start()
            self._authenticator.configure_curve_callback(credentials_provider=self.allow_list)

    @property
    def auth_denied(self) -> int:
        """Handshakes refused by the allow-list (0 without one)."""
        return self.allow_list.denied if self.allow_list is not None else 0

    def _close(self) -> None:
        self.socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()

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
            self._close()

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
