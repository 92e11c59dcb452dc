"""vLLM's KV events, produced by vLLM's own code: its msgspec structs encoded by its encoder (the
current map form, and the positional-array form of older releases rebuilt from the same structs)
and its real `ZmqEventPublisher` on loopback, with its replay ROUTER socket. The subscriber keeps a
`PrefixIndex` right through gaps the replay fills, gaps it cannot fill, undecodable batches and
engine restarts; garbage never escapes the decoder as anything but `KVEventDecodeError`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest
import zmq
from http_servers import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcache.router.block_hash import block_digests, block_hashes
from kvcache.router.kv_events import (
    AllBlocksCleared,
    EventBatch,
    KVEventDecodeError,
    KVEventSubscriber,
    decode_frame,
    decode_payload,
)
from kvcache.router.prefix_index import PrefixIndex

kv_events = pytest.importorskip("vllm.distributed.kv_events")
import msgspec  # noqa: E402  (vLLM's dependency: the tests encode with vLLM's own encoder)

ENCODER = msgspec.msgpack.Encoder()  # what ZmqEventPublisher encodes with


def vllm_stored(hashes: list, parent=None, **extra) -> kv_events.BlockStored:
    return kv_events.BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=list(range(4 * len(hashes))),
        block_size=4,
        lora_id=extra.pop("lora_id", None),
        medium=extra.pop("medium", "GPU"),
        lora_name=extra.pop("lora_name", None),
        **extra,
    )


def vllm_batch(*events, dp_rank: int | None = 0) -> kv_events.KVEventBatch:
    return kv_events.KVEventBatch(
        ts=1_700_000_000.25, events=list(events), data_parallel_rank=dp_rank
    )


def positional(event, fields: int | None = None):
    """`event` as an older vLLM encoded it: the same struct with `array_like=True`, tagged; with
    `fields`, only the first ones (the releases before the rest were appended)."""
    declared = msgspec.structs.fields(type(event))[:fields]
    legacy = msgspec.defstruct(
        type(event).__name__,
        [(f.name, f.type) if f.required else (f.name, f.type, f.default) for f in declared],
        array_like=True,
        tag=True,
        omit_defaults=True,
    )
    return legacy(**{f.name: getattr(event, f.name) for f in declared})


RICH_STORED = vllm_stored(
    [2**64 - 1, 7, 123456789],
    parent=42,
    lora_id=3,
    lora_name="adapter",
    extra_keys=[("adapter",), None, None],
    group_idx=1,
    kv_cache_spec_kind="full_attention",
    session_id="s1",
)
REMOVED = kv_events.BlockRemoved(block_hashes=[7], medium="GPU", group_idx=1)


def assert_same(ours, theirs, fields: int | None = None) -> None:
    """Our dataclass holds what vLLM's struct held (in its first `fields` fields; the rest are
    absent from older releases and default to None)."""
    assert type(ours).__name__ == type(theirs).__name__
    sent = {f.name for f in msgspec.structs.fields(type(theirs))[:fields]}
    for name in ours.__dataclass_fields__:
        value = getattr(theirs, name) if name in sent else None
        assert getattr(ours, name) == (tuple(value) if isinstance(value, list) else value), name


# --- decoding ------------------------------------------------------------------------------------


def test_the_current_map_form_decodes_field_for_field():
    payload = ENCODER.encode(vllm_batch(RICH_STORED, REMOVED, kv_events.AllBlocksCleared()))
    assert msgpack.unpackb(payload)[1][0]["type"] == "BlockStored"  # it is the map form
    batch = decode_frame([b"", (5).to_bytes(8, "big"), payload])
    assert (batch.seq, batch.ts, batch.dp_rank) == (5, 1_700_000_000.25, 0)
    stored, removed, cleared = batch.events
    assert_same(stored, RICH_STORED)
    assert_same(removed, REMOVED)
    assert cleared == AllBlocksCleared()


@pytest.mark.parametrize("fields", [None, 5, 6, 7])
def test_the_older_positional_form_decodes_to_the_same_events(fields):
    events = [positional(RICH_STORED, fields), positional(REMOVED, fields and 2)]
    events.append(positional(kv_events.AllBlocksCleared()))
    payload = ENCODER.encode(kv_events.EventBatch(ts=2.5, events=events))
    assert msgpack.unpackb(payload)[1][0][0] == "BlockStored"  # a tagged array
    stored, removed, cleared = decode_payload(9, payload).events
    assert_same(stored, RICH_STORED, fields)
    assert_same(removed, REMOVED, fields and 2)
    assert cleared == AllBlocksCleared()


def test_a_batch_from_releases_without_dp_rank_or_as_a_map_decodes():
    event = vllm_stored([1])
    old = decode_payload(0, ENCODER.encode((3.0, [positional(event, 5)])))
    assert old.dp_rank is None and old.events[0].block_hashes == (1,)
    as_map = {"ts": 3.0, "events": [event], "data_parallel_rank": 1}
    assert decode_payload(0, ENCODER.encode(as_map)).dp_rank == 1


def test_hashes_as_bytes_or_signed_ints_become_the_low_64_bits():
    """An engine with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0 publishes whole digests; releases
    that hashed with Python's hash() published signed ints. Both meet the router's hashes."""
    tokens = list(range(100, 132))
    digests = block_digests(tokens, 16, "0")
    event = vllm_stored(digests[1:], parent=digests[0])
    stored = decode_payload(0, ENCODER.encode(vllm_batch(event))).events[0]
    assert list(stored.block_hashes) == block_hashes(tokens, 16, "0")[1:]
    assert stored.parent_block_hash == block_hashes(tokens, 16, "0")[0]
    signed = decode_payload(0, ENCODER.encode(vllm_batch(vllm_stored([-1])))).events[0]
    assert signed.block_hashes == (2**64 - 1,)


def publisher_on_loopback(**options) -> tuple[kv_events.ZmqEventPublisher, int, int]:
    port, replay = free_port(), free_port()
    publisher = kv_events.ZmqEventPublisher(
        data_parallel_rank=0,
        endpoint=f"tcp://*:{port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay}",
        **options,
    )
    return publisher, port, replay


def test_frames_from_vllms_real_publisher_decode():
    publisher, port, _ = publisher_on_loopback(topic="kv")
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"kv")
        sub.connect(f"tcp://127.0.0.1:{port}")
        publisher.publish(vllm_batch())  # a first batch may go before the subscription lands
        while not sub.poll(100):
            publisher.publish(vllm_batch())
        sub.recv_multipart()
        publisher.publish(vllm_batch(RICH_STORED, REMOVED, dp_rank=None))
        while True:
            frames = sub.recv_multipart()
            batch = decode_frame(frames)
            if batch.events:
                break
        assert frames[0] == b"kv" and len(frames[1]) == 8
        assert batch.dp_rank == 0  # the publisher stamps its rank
        assert_same(batch.events[0], RICH_STORED)
        assert_same(batch.events[1], REMOVED)
    finally:
        sub.close(linger=0)
        publisher.shutdown()


# --- malformed input -----------------------------------------------------------------------------


def decodes_or_raises_typed(payload: bytes) -> None:
    try:
        batch = decode_payload(3, payload)
    except KVEventDecodeError as error:
        assert error.seq == 3 and str(error)
    else:
        assert isinstance(batch, EventBatch)


VALID = ENCODER.encode(
    vllm_batch(RICH_STORED, REMOVED, kv_events.AllBlocksCleared(), positional(RICH_STORED))
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=40)
    | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type"]),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=30,
)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_the_typed_error(payload):
    decodes_or_raises_typed(payload)


@FUZZ
@given(st.data())
def test_corrupted_real_payloads_raise_only_the_typed_error(data):
    payload = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(payload) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            payload[at] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "cut":
            del payload[at:]
            if not payload:
                break
        else:
            payload.insert(at, data.draw(st.integers(0, 255)))
    decodes_or_raises_typed(bytes(payload))


@FUZZ
@given(msgpack_values)
def test_any_msgpack_value_raises_only_the_typed_error(value):
    decodes_or_raises_typed(msgpack.packb(value))


@FUZZ
@given(st.data())
def test_real_events_with_a_field_replaced_raise_only_the_typed_error(data):
    batch = msgpack.unpackb(VALID)
    event = data.draw(st.sampled_from(batch[1]))
    keys = list(event) if isinstance(event, dict) else list(range(len(event)))
    key = data.draw(st.sampled_from(keys))
    if data.draw(st.booleans()):
        del event[key]
    else:
        event[key] = data.draw(msgpack_values)
    decodes_or_raises_typed(msgpack.packb(batch))


def test_malformed_frames_say_what_is_wrong():
    with pytest.raises(KVEventDecodeError, match="3 frames"):
        decode_frame([b"", b"x"])
    with pytest.raises(KVEventDecodeError, match="8 bytes") as seqless:
        decode_frame([b"", b"\x00" * 4, VALID])
    assert seqless.value.seq is None
    with pytest.raises(KVEventDecodeError, match="unknown event type") as unknown:
        decode_frame([b"", (4).to_bytes(8, "big"), msgpack.packb([1.0, [{"type": "Nope"}]])])
    assert unknown.value.seq == 4
    with pytest.raises(KVEventDecodeError, match="BlockStored lacks token_ids"):
        decode_payload(0, msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": []}]]))


# --- the subscriber against vLLM's real publisher ------------------------------------------------


class Relay:
    """Forwards vLLM's PUB stream to the subscriber, dropping the seqs in `drop` and garbling the
    payloads of those in `garble`: a lossy network between the engine and the router, with the
    engine's replay endpoint untouched. `last` is the last seq it received."""

    def __init__(self) -> None:
        self.inbound, self.outbound = free_port(), free_port()
        self.drop: set[int] = set()
        self.garble: set[int] = set()
        self.last = -1
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._forward, daemon=True)
        self._thread.start()
        self._ready.wait()

    def _forward(self) -> None:
        context = zmq.Context.instance()
        sub, pub = context.socket(zmq.SUB), context.socket(zmq.PUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.bind(f"tcp://127.0.0.1:{self.inbound}")
        pub.bind(f"tcp://127.0.0.1:{self.outbound}")
        self._ready.set()
        try:
            while not self._stop.is_set():
                if sub.poll(20):
                    topic, seq, payload = sub.recv_multipart()
                    self.last = int.from_bytes(seq, "big")
                    if self.last in self.garble:
                        payload = b"\xc1" + payload  # 0xc1: never used in msgpack
                    if self.last not in self.drop:
                        pub.send_multipart([topic, seq, payload])
        finally:
            sub.close(linger=0)
            pub.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Engine:
    """vLLM's real `ZmqEventPublisher`, as an engine runs it, publishing through a `Relay`."""

    def __init__(self, relay: Relay, buffer_steps: int = 10_000) -> None:
        self.relay = relay
        self.replay_port = free_port()
        self.buffer_steps = buffer_steps
        self.publisher = self._start()

    def _start(self) -> kv_events.ZmqEventPublisher:
        for _ in range(50):  # a restarted engine may find its replay port not yet released
            try:
                return kv_events.ZmqEventPublisher(
                    data_parallel_rank=0,
                    endpoint=f"tcp://127.0.0.1:{self.relay.inbound}",
                    replay_endpoint=f"tcp://127.0.0.1:{self.replay_port}",
                    buffer_steps=self.buffer_steps,
                )
            except zmq.ZMQError:
                time.sleep(0.05)
        raise RuntimeError("replay port stayed busy")

    def publish(self, *events) -> None:
        self.publisher.publish(kv_events.KVEventBatch(ts=time.time(), events=list(events)))

    def restart(self) -> None:
        self.publisher.shutdown()
        self.publisher = self._start()

    def close(self) -> None:
        self.publisher.shutdown()


def stored(*hashes: int) -> kv_events.BlockStored:
    return vllm_stored(list(hashes))


def removed(*hashes: int) -> kv_events.BlockRemoved:
    return kv_events.BlockRemoved(block_hashes=list(hashes), medium="GPU")


async def until(
    condition: Callable[[], bool], what: str, keep_publishing: Engine | None = None
) -> None:
    """Waits (10 s at most) for `condition`; `keep_publishing` publishes empty batches meanwhile,
    for streams that lose their first batches while a connection is being made."""
    deadline = time.monotonic() + 10.0
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited 10 s for {what}")
        if keep_publishing is not None:
            keep_publishing.publish()  # an empty batch: nothing for the index
        await asyncio.sleep(0.05 if keep_publishing else 0.01)


@contextlib.asynccontextmanager
async def following(
    engine: Engine, index: PrefixIndex, replay: bool = True
) -> AsyncIterator[KVEventSubscriber]:
    """A subscriber feeding `index` from `engine`, once a first batch has come through its live
    socket."""
    subscriber = KVEventSubscriber(
        "e0",
        f"tcp://127.0.0.1:{engine.relay.outbound}",
        f"tcp://127.0.0.1:{engine.replay_port}" if replay else None,
        index.apply,
        replay_timeout_s=1.0,
    )
    task = asyncio.create_task(subscriber.run())
    try:
        live = lambda: subscriber.stats.batches > subscriber.stats.replayed  # noqa: E731
        await until(live, "a first live batch", keep_publishing=engine)
        yield subscriber
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def held(index: PrefixIndex, *hashes: int) -> bool:
    return all(index.match([h]).get("e0") == 1 for h in hashes)


def absent(index: PrefixIndex, *hashes: int) -> bool:
    return all("e0" not in index.match([h]) for h in hashes)


@pytest.fixture
def engine():
    relay = Relay()
    engines: list[Engine] = []

    def start(**options) -> Engine:
        engines.append(Engine(relay, **options))
        return engines[-1]

    yield start
    for started in engines:
        started.close()
    relay.close()


def test_a_new_subscriber_rebuilds_the_engines_blocks_from_replay(engine):
    """A router (re)starting after the engine did gets its state from the replay buffer, so
    router replicas agree."""
    source = engine()
    source.publish(stored(1, 2, 3))
    source.publish(removed(2))
    time.sleep(0.3)  # published before anyone listens: live subscribers never see these

    async def scenario() -> None:
        replicas = [PrefixIndex(), PrefixIndex()]
        async with following(source, replicas[0]) as first:
            async with following(source, replicas[1]) as second:
                source.publish(stored(4))
                await until(lambda: all(held(i, 4) for i in replicas), "live batch")
        for index in replicas:
            assert held(index, 1, 3, 4) and absent(index, 2)
        assert first.stats.replayed >= 2 and first.stats.resets == 0
        assert second.stats.resets == 0

    asyncio.run(scenario())


def test_a_gap_is_filled_from_the_replay_endpoint(engine):
    source = engine()
    index = PrefixIndex()

    async def scenario() -> None:
        async with following(source, index) as subscriber:
            source.publish(stored(1, 2))
            await until(lambda: held(index, 1, 2), "first blocks")
            resets, replayed = subscriber.stats.resets, subscriber.stats.replayed
            source.relay.drop.update({source.relay.last + 1, source.relay.last + 2})
            source.publish(removed(1))  # lost on the way
            source.publish(stored(3))  # lost on the way
            source.publish(stored(4))
            await until(lambda: held(index, 4), "the batch after the gap")
            assert held(index, 2, 3) and absent(index, 1)
            assert subscriber.stats.replayed >= replayed + 2
            assert subscriber.stats.resets == resets

    asyncio.run(scenario())


def test_a_gap_replay_cannot_fill_forgets_the_engine_rather_than_claim_removed_blocks(engine):
    source = engine(buffer_steps=2)
    index = PrefixIndex()

    async def scenario() -> None:
        async with following(source, index) as subscriber:
            source.publish(stored(1, 2))
            await until(lambda: held(index, 1, 2), "first blocks")
            resets = subscriber.stats.resets
            source.relay.drop.update(range(source.relay.last + 1, source.relay.last + 5))
            source.publish(removed(1))  # lost, and out of the replay buffer by the time...
            source.publish(stored(3))
            source.publish(stored(5))
            source.publish(stored(6))
            source.publish(stored(4))  # ...this one shows the gap
            await until(lambda: held(index, 4), "the batch after the gap")
            assert absent(index, 1)  # removed by the engine: must not be claimed
            assert absent(index, 2, 3)  # still held, but unknowable: a miss is the safe side
            assert held(index, 6)  # still in the replay buffer
            assert subscriber.stats.resets == resets + 1

    asyncio.run(scenario())


def test_without_a_replay_endpoint_a_gap_forgets_the_engine(engine):
    source = engine()
    index = PrefixIndex()

    async def scenario() -> None:
        async with following(source, index, replay=False) as subscriber:
            source.publish(stored(1))
            await until(lambda: held(index, 1), "first block")
            resets = subscriber.stats.resets
            source.relay.drop.add(source.relay.last + 1)
            source.publish(removed(1))
            source.publish(stored(2))
            await until(lambda: held(index, 2), "the batch after the gap")
            assert absent(index, 1) and subscriber.stats.resets == resets + 1

    asyncio.run(scenario())


def test_an_undecodable_batch_forgets_the_engine(engine):
    """The frame's seq is readable but its payload is not: that batch is lost."""
    source = engine()
    index = PrefixIndex()

    async def scenario() -> None:
        async with following(source, index, replay=False) as subscriber:
            source.publish(stored(1))
            await until(lambda: held(index, 1), "first block")
            resets = subscriber.stats.resets
            source.relay.garble.add(source.relay.last + 1)
            source.publish(removed(1))
            source.publish(stored(2))
            await until(lambda: held(index, 2), "the batch after the garbled one")
            assert absent(index, 1)
            assert subscriber.stats.decode_errors == 1
            assert subscriber.stats.resets == resets + 1

    asyncio.run(scenario())


def test_an_engine_restart_forgets_what_the_old_engine_held(engine):
    source = engine()
    index = PrefixIndex()

    async def scenario() -> None:
        async with following(source, index) as subscriber:
            for block in range(1, 6):
                source.publish(stored(block))
            await until(lambda: held(index, 5), "blocks of the first engine")
            resets = subscriber.stats.resets
            source.restart()  # its seq starts again at 0
            restarted = lambda: subscriber.stats.resets > resets  # noqa: E731
            await until(restarted, "the new engine's stream", keep_publishing=source)
            source.publish(stored(10))
            await until(lambda: held(index, 10), "the new engine's blocks")
            assert absent(index, 1, 2, 3, 4, 5)

    asyncio.run(scenario())


def test_a_restart_seen_before_any_live_batch_is_told_by_the_engines_clock(engine):
    """The subscriber has only replayed batches when the engine restarts: the new engine's
    first seqs look like batches it has, but they are stamped later than its last one."""
    source = engine()
    for block in (1, 2, 3):
        source.publish(stored(block))
    time.sleep(0.3)
    index = PrefixIndex()

    async def scenario() -> None:
        subscriber = KVEventSubscriber(
            "e0",
            f"tcp://127.0.0.1:{source.relay.outbound}",
            f"tcp://127.0.0.1:{source.replay_port}",
            index.apply,
        )
        task = asyncio.create_task(subscriber.run())
        try:
            await until(lambda: held(index, 1, 2, 3), "the replayed blocks")
            source.restart()
            source.publish(stored(10))
            await until(lambda: held(index, 10), "the new engine's blocks", keep_publishing=source)
            assert absent(index, 1, 2, 3) and subscriber.stats.resets == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
