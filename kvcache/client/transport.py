"""The client's transport seam: send one request's parts to a node, receive one reply's parts.

Everything above this class speaks in parts (header bytes, payload buffers); an RDMA transport
(NIXL, UCX) can carry the payload parts later behind the same four calls. The ZeroMQ version uses a
DEALER socket with IMMEDIATE set, so nothing queues for a node that is not connected: a dead node
shows up as an unwritable socket and a timeout, never as a backlog replayed after it returns.

With CurveZMQ keys the socket is a CURVE client. IMMEDIATE makes a refused handshake (a key not on
the node's allow-list, a wrong server key, a node without CURVE) look like a dead node: the
connection never completes, nothing can be sent, and the caller's timeout turns the call into
misses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq

from kvcache.core.config import CurveClientKeys
from kvcache.core.protocol import Limits


class NodeConnection:
    def __init__(
        self,
        context: zmq.Context,
        address: str,
        limits: Limits,
        curve: CurveClientKeys | None = None,
    ) -> None:
        self.address = address
        self._context = context
        self._limits = limits
        self._curve = curve
        self.socket = self._open()

    def _open(self) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.MAXMSGSIZE, self._limits.max_message_part)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self._curve is not None:
            socket.curve_serverkey = self._curve.server_public_key
            socket.curve_publickey = self._curve.public_key
            socket.curve_secretkey = self._curve.secret_key
        socket.connect(self.address)
        return socket

    def try_send(self, parts: Sequence[Any]) -> bool:
        """Queue a whole request without blocking; False when the node cannot take it now."""
        try:
            self.socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def try_receive(self) -> list[zmq.Frame] | None:
        try:
            return self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None

    def reset(self) -> None:
        """Drop everything queued or half-received (after a timeout) and reconnect afresh."""
        self.socket.close(linger=0)
        self.socket = self._open()

    def close(self) -> None:
        self.socket.close(linger=0)
