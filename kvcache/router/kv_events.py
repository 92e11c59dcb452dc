"""vLLM's KV events: the wire format decoded into our own messages, and a subscriber per engine.

Each engine publishes on a ZeroMQ PUB socket frames `[topic, seq (8 bytes, big-endian), payload]`;
the payload is msgpack of `EventBatch` (`[ts, events, data_parallel_rank]`) as vLLM's msgspec
structs encode it (`vllm/distributed/kv_events.py`). Events are tagged unions: current vLLM sends
each as a map with a `"type"` key, older releases as a positional array whose first element is the
tag. Both decode here into the same frozen dataclasses, so nothing past this module knows which
one an engine sent. Decoding never raises anything but `KVEventDecodeError`.

The subscriber's one promise is the index's safety rule: it may lose blocks an engine holds, never
leave claimed blocks the engine dropped. Whenever it cannot be sure of that (lost batches the
replay endpoint cannot return, an undecodable batch, an engine restart), it tells its consumer to
forget the engine with a batch holding only `AllBlocksCleared`, then carries on from what it has.
"""

from __future__ import annotations

import logging
import reprlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from kvcache.router.block_hash import low_64_bits

log = logging.getLogger(__name__)

_LOW_64 = (1 << 64) - 1


# --- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks the engine now holds in its prefix cache. `token_ids` covers all of them
    (`block_size` tokens each); `parent_block_hash` is the block before the first."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None  # "GPU", "CPU", "STORAGE"; None from releases before tiers
    lora_name: str | None = None
    group_idx: int | None = None  # the KV-cache group (hybrid models have several)


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The engine dropped every cached block (a prefix-cache reset), or the subscriber lost track
    of what it holds."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    seq: int  # the publisher's sequence number: consecutive, from 0 at each engine start
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int | None = None


class KVEventDecodeError(Exception):
    """A frame that is not vLLM's KV-event wire format. `seq` is set when the frame's header was
    readable, so the subscriber knows which batch it lost."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message if seq is None else f"batch {seq}: {message}")
        self.seq = seq


# --- decoding ------------------------------------------------------------------------------------

# Positional fields after the tag, in the order vLLM declares them (fields were only ever
# appended, so a shorter array from an older release is a prefix of this).
_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_POSITIONAL_FIELDS: dict[str, tuple[str, ...]] = {
    "BlockStored": _STORED_FIELDS,
    "BlockRemoved": _REMOVED_FIELDS,
    "AllBlocksCleared": (),
}
_BATCH_FIELDS = ("ts", "events", "data_parallel_rank")


def decode_frame(frames: Sequence[bytes]) -> EventBatch:
    """One message from the PUB socket (or a replay reply), `[topic, seq, payload]`."""
    if len(frames) != 3:
        raise KVEventDecodeError(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    return decode_payload(_seq(frames[1]), frames[2])


def _seq(raw: bytes) -> int:
    if len(raw) != 8:
        raise KVEventDecodeError(f"sequence frame must be 8 bytes, got {len(raw)}")
    return int.from_bytes(raw, "big")


def decode_payload(seq: int, payload: bytes) -> EventBatch:
    """The msgpack `EventBatch` published as batch `seq`."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
    except ValueError as error:  # every error msgpack raises on bad input is a ValueError
        reason = str(error) or type(error).__name__  # FormatError comes without a message
        raise KVEventDecodeError(f"payload is not msgpack: {reason}", seq) from error
    try:
        return _batch(seq, raw)
    except _Malformed as error:
        raise KVEventDecodeError(str(error), seq) from None


class _Malformed(Exception):
    """Raised inside the decoder; `decode_payload` adds the batch's seq."""


def _batch(seq: int, raw: Any) -> EventBatch:
    # EventBatch is array_like in releases; a development snapshot of vLLM's main sent a map.
    fields = _fields(raw, _BATCH_FIELDS, required=2, what="event batch")
    ts, events, dp_rank = fields.get("ts"), fields.get("events"), fields.get("data_parallel_rank")
    if not _is_number(ts):
        raise _Malformed(f"batch timestamp must be a number, got {type(ts).__name__}")
    if not isinstance(events, list):
        raise _Malformed(f"batch events must be an array, got {type(events).__name__}")
    dp_rank = _optional_int(dp_rank, "data_parallel_rank")
    return EventBatch(seq, float(ts), tuple(_event(e) for e in events), dp_rank)


def _event(raw: Any) -> KVEvent:
    if isinstance(raw, dict):
        tag, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw:
        tag, fields = raw[0], None
    else:
        raise _Malformed(f"an event must be a map or a tagged array, got {_describe(raw)}")
    if not isinstance(tag, str) or tag not in _POSITIONAL_FIELDS:
        raise _Malformed(f"unknown event type {_describe(tag)}")
    if fields is None:
        fields = dict(zip(_POSITIONAL_FIELDS[tag], raw[1:]))
    if tag == "BlockStored":
        _require(fields, tag, ("block_hashes", "token_ids", "block_size"))
        return BlockStored(
            block_hashes=_hashes(fields["block_hashes"]),
            parent_block_hash=_optional_hash(fields.get("parent_block_hash")),
            token_ids=_token_ids(fields["token_ids"]),
            block_size=_int(fields["block_size"], "block_size"),
            lora_id=_optional_int(fields.get("lora_id"), "lora_id"),
            medium=_optional_str(fields.get("medium"), "medium"),
            lora_name=_optional_str(fields.get("lora_name"), "lora_name"),
            group_idx=_optional_int(fields.get("group_idx"), "group_idx"),
        )
    if tag == "BlockRemoved":
        _require(fields, tag, ("block_hashes",))
        return BlockRemoved(
            block_hashes=_hashes(fields["block_hashes"]),
            medium=_optional_str(fields.get("medium"), "medium"),
            group_idx=_optional_int(fields.get("group_idx"), "group_idx"),
        )
    return AllBlocksCleared()


def _fields(raw: Any, names: tuple[str, ...], required: int, what: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, list) and len(raw) >= required:
        return dict(zip(names, raw))
    raise _Malformed(f"{what} must be a map or an array of {required}+, got {_describe(raw)}")


def _require(fields: dict[str, Any], tag: str, names: tuple[str, ...]) -> None:
    missing = [name for name in names if name not in fields]
    if missing:
        raise _Malformed(f"{tag} lacks {', '.join(missing)}")


def _hash(value: Any) -> int:
    """A block hash as an int. vLLM publishes `ExternalBlockHash = bytes | int`: the low 64 bits
    of the SHA-256 digest by default (`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`), the whole digest
    as bytes otherwise; Python's builtin `hash()`, which older releases could use, gives signed
    ints. All reduce to the same low 64 bits, which is what `block_hash.block_hashes` computes
    for a request, so the index compares one kind of key whatever each engine sends."""
    if type(value) is int:
        return value & _LOW_64
    if isinstance(value, bytes) and value:
        return low_64_bits(value)
    raise _Malformed(f"a block hash must be an int or bytes, got {_describe(value)}")


def _hashes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _Malformed(f"block_hashes must be an array, got {_describe(value)}")
    return tuple(_hash(item) for item in value)


def _optional_hash(value: Any) -> int | None:
    return None if value is None else _hash(value)


def _token_ids(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(token) is int for token in value):
        raise _Malformed(f"token_ids must be an array of ints, got {_describe(value)}")
    return tuple(value)


def _int(value: Any, name: str) -> int:
    if type(value) is not int:
        raise _Malformed(f"{name} must be an int, got {_describe(value)}")
    return value


def _optional_int(value: Any, name: str) -> int | None:
    return None if value is None else _int(value, name)


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _Malformed(f"{name} must be a string or nil, got {_describe(value)}")
    return value


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {reprlib.repr(value)}"  # reprlib: bounded size and depth


# --- subscriber ----------------------------------------------------------------------------------

BatchHandler = Callable[[str, EventBatch], None]

# vLLM's replay endpoint ends its answer with this sequence frame: -1 as a signed 8-byte int.
_REPLAY_END = (-1).to_bytes(8, "big", signed=True)


@dataclass
class SubscriberStats:
    batches: int = 0  # delivered to on_batch, live or replayed
    replayed: int = 0  # of those, from the replay endpoint
    resets: int = 0  # times the engine's entries were dropped
    decode_errors: int = 0


class KVEventSubscriber:
    """Follows one engine's (one DP rank's) KV events and hands each batch, in seq order, to
    `on_batch(engine_id, batch)`.

    `endpoint` is where the engine's publisher listens (`tcp://*:P` on the engine binds it; the
    subscriber connects to `tcp://HOST:P`). With a `replay_endpoint` (the engine's ROUTER socket)
    lost batches are asked for again: at start, from seq 0, which rebuilds the index after a
    router restart; and on a gap in the live seqs. What replay cannot return, and every engine
    restart (the live seq going back), becomes a reset batch (`AllBlocksCleared` only, with the
    seq of the batch that revealed the loss), then events flow on. Runs as an asyncio task:
    `asyncio.create_task(subscriber.run())`; cancel it to stop.
    """

    def __init__(
        self,
        engine_id: str,
        endpoint: str,
        replay_endpoint: str | None,
        on_batch: BatchHandler,
        *,
        topic: str = "",
        replay_timeout_s: float = 2.0,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.engine_id = engine_id
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.stats = SubscriberStats()
        self._on_batch = on_batch
        self._topic = topic.encode()
        self._replay_timeout_ms = int(replay_timeout_s * 1000)
        self._context = context or zmq.asyncio.Context.instance()
        self._applied = -1  # last seq delivered; -1 so that a first batch past 0 is a gap
        self._applied_ts: float | None = None  # the engine's stamp on that batch
        self._last_live: int | None = None  # last seq seen on the PUB stream

    async def run(self) -> None:
        """Subscribe, catch up through replay, then follow the live stream until cancelled. A
        later `run` of the same subscriber resumes after the last batch it delivered."""
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        sub.connect(self.endpoint)
        try:
            if self.replay_endpoint is not None:
                await self._replay_from(self.replay_endpoint, self._applied + 1)
            while True:
                await self._on_live(await sub.recv_multipart())
        finally:
            sub.close(linger=0)

    async def _on_live(self, frames: list[bytes]) -> None:
        batch, seq = self._decode(frames)
        if seq is None:
            return  # the next readable frame shows the gap
        if self._restarted(seq, batch):
            self._reset(seq, "engine restarted (its seq went back)")
            self._applied, self._applied_ts = -1, None
        self._last_live = seq
        if seq <= self._applied:
            return  # replay delivered it already
        if seq > self._applied + 1 and self.replay_endpoint is not None:
            await self._replay_from(self.replay_endpoint, self._applied + 1)
            if seq <= self._applied:
                return
        self._take(seq, batch)

    def _restarted(self, seq: int, batch: EventBatch | None) -> bool:
        """A PUB stream's seqs only grow, so one that goes back comes from a new engine. So does
        an old seq stamped later than the last batch delivered: a batch seen live after replay
        returned it carries its old stamp."""
        if self._last_live is not None and seq <= self._last_live:
            return True
        return (
            seq <= self._applied
            and batch is not None
            and self._applied_ts is not None
            and batch.ts > self._applied_ts
        )

    async def _replay_from(self, endpoint: str, start: int) -> None:
        """Ask the engine for every buffered batch from `start` on and deliver those not yet
        delivered; stops early (leaving the gap to the caller) on a timeout."""
        dealer = self._context.socket(zmq.DEALER)
        dealer.connect(endpoint)
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while await dealer.poll(self._replay_timeout_ms):
                frames = _replay_reply(await dealer.recv_multipart())
                if len(frames) == 3 and frames[1] == _REPLAY_END:
                    return
                batch, seq = self._decode(frames)
                if seq is not None and seq > self._applied:
                    if batch is not None:
                        self.stats.replayed += 1
                    self._take(seq, batch)
            log.warning("engine %s: replay from %d timed out", self.engine_id, start)
        finally:
            dealer.close(linger=0)

    def _decode(self, frames: list[bytes]) -> tuple[EventBatch | None, int | None]:
        """(batch, seq); the batch is None when only the seq could be read, and both are None
        when not even that."""
        try:
            batch = decode_frame(frames)
        except KVEventDecodeError as error:
            log.warning("engine %s: undecodable KV event frame: %s", self.engine_id, error)
            self.stats.decode_errors += 1
            return None, error.seq
        return batch, batch.seq

    def _take(self, seq: int, batch: EventBatch | None) -> None:
        """Deliver batch `seq` (None: lost to a decode error), resetting first when batches
        between the last delivered one and it are missing."""
        skipped = seq > self._applied + 1
        if skipped or batch is None:
            lost = f"batches {self._applied + 1}..{seq - 1}" if skipped else f"batch {seq}"
            self._reset(seq, f"{lost} lost")
        if batch is not None:
            self.stats.batches += 1
            self._on_batch(self.engine_id, batch)
            self._applied_ts = batch.ts
        self._applied = seq

    def _reset(self, seq: int, reason: str) -> None:
        log.warning("engine %s: forgetting its blocks: %s", self.engine_id, reason)
        self.stats.resets += 1
        self._on_batch(self.engine_id, EventBatch(seq, time.time(), (AllBlocksCleared(),)))


def _replay_reply(frames: list[bytes]) -> list[bytes]:
    """A replay reply as the DEALER reads it, `[b"", topic, seq, payload]`, as a PUB message
    `[topic, seq, payload]`. Releases before the topic frame sent `[b"", seq, payload]`."""
    body = frames[1:] if frames and frames[0] == b"" else frames
    return [b"", *body] if len(body) == 2 else body
