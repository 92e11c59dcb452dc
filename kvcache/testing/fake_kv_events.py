"""A fake engine's prefix cache, announced as vLLM announces its own: KV events over ZeroMQ.

A prompt given as token ids is cut into full blocks hashed as vLLM hashes them (`sha256_cbor`:
`kvcache.router.block_hash`); the blocks not cached yet are announced in one `BlockStored`, as
vLLM does after a prefill. Frames are vLLM's: `[topic, seq (8 bytes, big-endian), payload]`, the
payload msgpack of `EventBatch` (`[ts, events, data_parallel_rank]`) with each event a map tagged
`"type"`, byte for byte what vLLM 0.32's msgspec structs encode (plain msgpack here: vLLM is no
dependency of the package). A replay endpoint answers as vLLM's does. Blocks are never evicted.

The publishing socket is XPUB where vLLM's is PUB: a subscriber reads the same frames, and the
fake learns when one subscribed, so a test can wait for the router before sending (a PUB drops
what it publishes before a subscription has arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from kvcache.router.block_hash import block_hashes

_REPLAY_END = (-1).to_bytes(8, "big", signed=True)  # vLLM's ZmqEventPublisher.END_SEQ


def block_stored(
    hashes: Sequence[int], parent: int | None, token_ids: Sequence[int], block_size: int
) -> dict[str, Any]:
    """A `BlockStored` event of blocks on the GPU, fields in vLLM's order (msgspec keeps the
    declared order and omits only the defaulted fields that are unset)."""
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": parent,
            "token_ids": list(token_ids), "block_size": block_size, "lora_id": None,
            "medium": "GPU", "lora_name": None}  # fmt: skip


def _bind(socket: zmq.asyncio.Socket, endpoint: str) -> str:
    """Binds `endpoint` and returns the address bound (a `*` port becomes the OS's choice)."""
    socket.bind(endpoint)
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def encode_batch(ts: float, events: list[dict[str, Any]], dp_rank: int = 0) -> bytes:
    """An `EventBatch` payload; vLLM's publisher stamps its DP rank on every batch."""
    return msgpack.packb([ts, events, dp_rank])


@dataclass
class FakeKVEvents:
    """The fake engine's block cache and where it publishes; `published` and `subscriptions`
    are for tests to watch."""

    endpoint: str = "tcp://127.0.0.1:*"  # bound by the engine; `*`: the address it got
    replay_endpoint: str | None = "tcp://127.0.0.1:*"
    block_size: int = 16
    hash_seed: str = "0"  # the PYTHONHASHSEED a real engine would run with
    topic: str = ""
    cached: set[int] = field(default_factory=set)
    published: int = 0  # batches sent; the next batch's seq
    subscriptions: int = 0
    _buffer: deque[tuple[int, bytes]] = field(
        default_factory=lambda: deque(maxlen=10_000), repr=False
    )  # (seq, payload) for replay, as vLLM's buffer_steps
    _socket: zmq.asyncio.Socket | None = field(default=None, repr=False)

    async def serve_prompt(self, token_ids: Sequence[int]) -> None:
        """Cache the prompt's full blocks and announce those that are new."""
        hashes = block_hashes(token_ids, self.block_size, self.hash_seed)
        first_new = next((i for i, h in enumerate(hashes) if h not in self.cached), len(hashes))
        if first_new == len(hashes):
            return
        self.cached.update(hashes[first_new:])
        parent = hashes[first_new - 1] if first_new else None
        tokens = token_ids[first_new * self.block_size : len(hashes) * self.block_size]
        await self._publish([block_stored(hashes[first_new:], parent, tokens, self.block_size)])

    async def _publish(self, events: list[dict[str, Any]]) -> None:
        if self._socket is None:
            raise RuntimeError("the publisher runs only inside `publishing()`")
        seq, payload = self.published, encode_batch(time.time(), events)
        self._buffer.append((seq, payload))
        self.published += 1
        await self._socket.send_multipart([self.topic.encode(), seq.to_bytes(8, "big"), payload])

    @contextlib.asynccontextmanager
    async def publishing(self) -> AsyncIterator[None]:
        """Bind the sockets and serve subscriptions and replay while the engine runs."""
        context = zmq.asyncio.Context.instance()
        self._socket = context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only the first
        self.endpoint = _bind(self._socket, self.endpoint)
        replay = None
        if self.replay_endpoint is not None:
            replay = context.socket(zmq.ROUTER)
            self.replay_endpoint = _bind(replay, self.replay_endpoint)
        tasks = [asyncio.create_task(self._count_subscriptions(self._socket))]
        if replay is not None:
            tasks.append(asyncio.create_task(self._serve_replay(replay)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for socket in (self._socket, replay):
                if socket is not None:
                    socket.close(linger=0)
            self._socket = None

    async def _count_subscriptions(self, socket: zmq.asyncio.Socket) -> None:
        while True:
            message = await socket.recv()
            if message[:1] == b"\x01":
                self.subscriptions += 1

    async def _serve_replay(self, socket: zmq.asyncio.Socket) -> None:
        """vLLM's replay protocol: `[client, b"", start seq]` in, every buffered batch from
        `start` as `[client, b"", topic, seq, payload]` out, then an end marker."""
        topic = self.topic.encode()
        while True:
            frames = await socket.recv_multipart()
            if len(frames) != 3:
                continue
            client, _, start = frames
            for seq, payload in list(self._buffer):
                if seq >= int.from_bytes(start, "big"):
                    await socket.send_multipart([client, b"", topic, seq.to_bytes(8, "big"),
                                                 payload])  # fmt: skip
            await socket.send_multipart([client, b"", b"", _REPLAY_END, b""])
