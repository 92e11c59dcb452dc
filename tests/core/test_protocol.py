"""The wire protocol: what encodes parses back unchanged, and everything malformed is refused with
its stable error code (never any other exception), on the request and on the reply side."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sample_keys import make_keys

from kvcache.core.errors import ErrorCode, ProtocolError
from kvcache.core.protocol import (
    DEFAULT_LIMITS,
    KEYED_OPS,
    PROTOCOL_VERSION,
    Limits,
    Op,
    Reply,
    Request,
    ValueInfo,
    check_payload_frames,
    decode_header,
    error_reply,
    frames_needed,
    parse_reply,
    parse_request,
    peek_id,
)

MiB = 1 << 20
FRAME = DEFAULT_LIMITS.max_frame_bytes
KEY = hashlib.blake2b(b"key", digest_size=32).digest()


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def header(**fields) -> bytes:
    """A GET header for one key, with `fields` replacing (or, set to ..., removing) entries."""
    base = {"v": PROTOCOL_VERSION, "id": 7, "op": "GET", "keys": [KEY]}
    base.update(fields)
    return pack({name: value for name, value in base.items() if value is not ...})


def put_header(vals, keys=None, **fields) -> bytes:
    keys = [KEY] * len(vals) if keys is None else keys
    return header(op="PUT", keys=keys, vals=vals, **fields)


def split_sizes(size: int, frames: int) -> list[int]:
    """Frame sizes that carry `size` bytes in `frames` frames as evenly as possible."""
    if frames == 0:
        return []
    step, rest = divmod(size, frames)
    return [step + (1 if index < rest else 0) for index in range(frames)]


def code_of(call, *args, **kwargs) -> ErrorCode:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    assert str(info.value).startswith(f"{info.value.code}: ")
    return info.value.code


# ---- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", [Op.GET, Op.CONTAINS, Op.DELETE])
def test_keyed_request_round_trips(op):
    keys = make_keys(5)
    request = Request(op, 42, keys)
    assert parse_request(request.encode(), []) == request


@pytest.mark.parametrize("op", [Op.STATS, Op.PING])
def test_unkeyed_request_round_trips_and_carries_no_keys(op):
    request = Request(op, 3)
    encoded = request.encode()
    assert "keys" not in msgpack.unpackb(encoded)
    assert parse_request(encoded, []) == request


def test_put_request_round_trips_with_sizes_checksums_and_meta():
    sizes = [0, 1, 100, FRAME, FRAME + 1, 3 * FRAME]
    values = [
        ValueInfo(size, frames_needed(size, FRAME), (1 << 64) - 1 - i, {"depth": i, "tag": b"x"})
        for i, size in enumerate(sizes)
    ]
    request = Request(Op.PUT, (1 << 64) - 1, make_keys(len(sizes)), values)
    frame_sizes = [s for v in values for s in split_sizes(v.size, v.frames)]
    assert parse_request(request.encode(), frame_sizes) == request


def test_request_header_is_a_msgpack_map_with_version_id_and_op_as_text():
    decoded = msgpack.unpackb(Request(Op.GET, 9, [KEY]).encode())
    assert decoded == {"v": 1, "id": 9, "op": "GET", "keys": [KEY]}


def test_parse_request_accepts_a_memoryview_header():
    request = Request(Op.GET, 1, [KEY])
    assert parse_request(memoryview(request.encode()), []) == request


values_strategy = st.integers(min_value=0, max_value=3 * FRAME).flatmap(
    lambda size: st.builds(
        ValueInfo,
        size=st.just(size),
        # Anything from the fewest frames the frame limit allows to one byte per frame (capped).
        frames=st.integers(
            frames_needed(size, FRAME), max(frames_needed(size, FRAME), min(size, 6))
        ),
        checksum=st.integers(min_value=0, max_value=(1 << 64) - 1),
        meta=st.dictionaries(
            st.text(max_size=8),
            st.one_of(st.integers(-(1 << 63), (1 << 64) - 1), st.text(max_size=8), st.binary()),
            max_size=4,
        ),
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(values_strategy, max_size=6),
    request_id=st.integers(min_value=0, max_value=(1 << 64) - 1),
)
def test_any_valid_put_round_trips(values, request_id):
    request = Request(Op.PUT, request_id, make_keys(len(values)), values)
    frame_sizes = [s for v in values for s in split_sizes(v.size, v.frames)]
    assert parse_request(request.encode(), frame_sizes) == request


def round_trip_reply(reply: Reply, request: Request, frame_sizes=()) -> Reply:
    return parse_reply(decode_header(reply.encode()), list(frame_sizes), request)


@pytest.mark.parametrize("op", [Op.PUT, Op.CONTAINS, Op.DELETE])
def test_flag_replies_round_trip(op):
    keys = make_keys(3)
    values = [ValueInfo(0, 0, 0)] * 3 if op is Op.PUT else []
    request = Request(op, 5, keys, values)
    reply = Reply(id=5, flags=[True, False, True])
    assert round_trip_reply(reply, request) == reply


def test_get_reply_round_trips_hits_misses_and_their_frames():
    request = Request(Op.GET, 11, make_keys(3))
    hit = ValueInfo(10, 2, 99, {"depth": 1})
    reply = Reply(id=11, values=[hit, None, ValueInfo(0, 0, 5)])
    assert round_trip_reply(reply, request, [4, 6]) == reply


def test_get_reply_of_only_misses_round_trips():
    request = Request(Op.GET, 1, make_keys(2))
    reply = Reply(id=1, values=[None, None])
    assert round_trip_reply(reply, request) == reply


def test_empty_batches_round_trip():
    for op in (Op.GET, Op.CONTAINS, Op.DELETE, Op.PUT):
        request = Request(op, 1, [])
        assert parse_request(request.encode(), []) == request
        assert round_trip_reply(Reply(id=1), request) == Reply(id=1)


def test_stats_and_ping_replies_round_trip():
    stats = {"hits": 3, "requests": {"GET": 2}}
    assert round_trip_reply(Reply(id=2, stats=stats), Request(Op.STATS, 2)) == Reply(
        id=2, stats=stats
    )
    assert round_trip_reply(Reply(id=3), Request(Op.PING, 3)).ok


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_reply_round_trips_its_code_and_message(code):
    error = ProtocolError(code, "what went wrong")
    reply = error_reply(17, error)
    assert not reply.ok
    parsed = round_trip_reply(reply, Request(Op.GET, 17, [KEY]))
    assert (parsed.id, parsed.code, parsed.message) == (17, code, "what went wrong")


def test_error_reply_without_an_id_is_accepted_for_any_request():
    reply = error_reply(None, ProtocolError(ErrorCode.MALFORMED_HEADER, "bad"))
    parsed = round_trip_reply(reply, Request(Op.PING, 5))
    assert parsed.id is None and parsed.code is ErrorCode.MALFORMED_HEADER


def test_error_header_carries_code_and_message_and_nothing_else():
    encoded = error_reply(4, ProtocolError(ErrorCode.BAD_KEY, "key 0")).encode()
    assert msgpack.unpackb(encoded) == {"v": 1, "id": 4, "code": "bad_key", "msg": "key 0"}


@pytest.mark.parametrize("code", ["no_such_code", 5, None, ["bad_key"]])
def test_reply_with_an_unknown_error_code_reads_as_internal(code):
    decoded = {"v": 1, "id": 1, "code": code, "msg": "?"}
    reply = parse_reply(decoded, [], Request(Op.PING, 1))
    assert reply.code is ErrorCode.INTERNAL


# ---- replies that do not fit their request -------------------------------------------------


def test_reply_with_another_id_is_refused():
    request = Request(Op.CONTAINS, 1, [KEY])
    assert code_of(round_trip_reply, Reply(id=2, flags=[True]), request) is (
        ErrorCode.MALFORMED_HEADER
    )


@pytest.mark.parametrize("flags", [[True], [True, True, True], "yes"])
def test_reply_with_the_wrong_number_of_flags_is_refused(flags):
    request = Request(Op.CONTAINS, 1, make_keys(2))
    assert code_of(parse_reply, {"v": 1, "id": 1, "flags": flags}, [], request) is (
        ErrorCode.MALFORMED_HEADER
    )


def test_flag_reply_with_payload_frames_is_refused():
    request = Request(Op.DELETE, 1, [KEY])
    decoded = {"v": 1, "id": 1, "flags": [True]}
    assert code_of(parse_reply, decoded, [3], request) is ErrorCode.FRAME_MISMATCH


def test_only_literal_true_flags_count_as_true():
    request = Request(Op.CONTAINS, 1, make_keys(3))
    reply = parse_reply({"v": 1, "id": 1, "flags": [1, "true", True]}, [], request)
    assert reply.flags == [False, False, True]


@pytest.mark.parametrize("vals", [[None], [None, None, None], {"a": 1}])
def test_get_reply_with_the_wrong_number_of_values_is_refused(vals):
    request = Request(Op.GET, 1, make_keys(2))
    assert code_of(parse_reply, {"v": 1, "id": 1, "vals": vals}, [], request) is (
        ErrorCode.MALFORMED_HEADER
    )


@pytest.mark.parametrize(
    ("frame_sizes", "why"),
    [([], "missing frames"), ([4, 6, 1], "extra frame"), ([5, 6], "wrong sizes")],
)
def test_get_reply_whose_frames_do_not_carry_its_values_is_refused(frame_sizes, why):
    request = Request(Op.GET, 1, [KEY])
    decoded = {"v": 1, "id": 1, "vals": [[10, 2, 0, {}]]}
    assert code_of(parse_reply, decoded, frame_sizes, request) is ErrorCode.FRAME_MISMATCH, why


def test_get_reply_with_an_oversize_value_is_refused():
    request = Request(Op.GET, 1, [KEY])
    size = DEFAULT_LIMITS.max_value_bytes + 1
    decoded = {"v": 1, "id": 1, "vals": [[size, frames_needed(size, FRAME), 0, {}]]}
    assert code_of(parse_reply, decoded, [], request) is ErrorCode.VALUE_TOO_LARGE


def test_stats_reply_that_is_not_a_map_reads_as_empty():
    assert parse_reply({"v": 1, "id": 1, "stats": [1]}, [], Request(Op.STATS, 1)).stats == {}


# ---- every error code where it belongs -----------------------------------------------------

TOO_BIG = DEFAULT_LIMITS.max_value_bytes + 1

# (id, header bytes, payload frame sizes, expected code)
BAD_REQUESTS = [
    ("not_msgpack", b"\xc1", [], ErrorCode.MALFORMED_HEADER),
    ("empty_header", b"", [], ErrorCode.MALFORMED_HEADER),
    ("truncated_msgpack", header()[:-3], [], ErrorCode.MALFORMED_HEADER),
    ("trailing_bytes", header() + b"\x00", [], ErrorCode.MALFORMED_HEADER),
    ("array_not_map", pack([1, 7, "GET", [KEY]]), [], ErrorCode.MALFORMED_HEADER),
    ("scalar_not_map", pack(1), [], ErrorCode.MALFORMED_HEADER),
    ("int_map_key", pack({"v": 1, "id": 1, "op": "PING", 5: 5}), [], ErrorCode.MALFORMED_HEADER),
    ("map_of_65_entries", header(**{f"x{i}": i for i in range(61)}), [],
     ErrorCode.MALFORMED_HEADER),
    ("ext_type", pack({"v": 1, "id": 1, "op": "PING", "x": msgpack.ExtType(1, b"a")}), [],
     ErrorCode.MALFORMED_HEADER),
    ("nested_2000_deep", b"\x81\xa1x" + b"\x91" * 2000 + b"\xc0", [], ErrorCode.MALFORMED_HEADER),
    ("missing_version", header(v=...), [], ErrorCode.UNSUPPORTED_VERSION),
    ("version_2", header(v=2), [], ErrorCode.UNSUPPORTED_VERSION),
    ("version_0", header(v=0), [], ErrorCode.UNSUPPORTED_VERSION),
    ("version_as_string", header(v="1"), [], ErrorCode.UNSUPPORTED_VERSION),
    ("missing_id", header(id=...), [], ErrorCode.MALFORMED_HEADER),
    ("negative_id", header(id=-1), [], ErrorCode.MALFORMED_HEADER),
    ("id_as_string", header(id="7"), [], ErrorCode.MALFORMED_HEADER),
    ("id_as_float", header(id=7.0), [], ErrorCode.MALFORMED_HEADER),
    ("id_as_bool", header(id=True), [], ErrorCode.MALFORMED_HEADER),
    ("unknown_op", header(op="EXPLODE"), [], ErrorCode.UNKNOWN_OP),
    ("lowercase_op", header(op="get"), [], ErrorCode.UNKNOWN_OP),
    ("op_as_int", header(op=1), [], ErrorCode.UNKNOWN_OP),
    ("op_as_bytes", header(op=b"GET"), [], ErrorCode.UNKNOWN_OP),
    ("op_as_list", header(op=["GET"]), [], ErrorCode.UNKNOWN_OP),
    ("missing_op", header(op=...), [], ErrorCode.UNKNOWN_OP),
    ("missing_keys", header(keys=...), [], ErrorCode.MALFORMED_HEADER),
    ("keys_not_a_list", header(keys=KEY), [], ErrorCode.MALFORMED_HEADER),
    ("keys_a_map", header(keys={"a": KEY}), [], ErrorCode.MALFORMED_HEADER),
    ("key_of_31_bytes", header(keys=[KEY[:31]]), [], ErrorCode.BAD_KEY),
    ("key_of_33_bytes", header(keys=[KEY + b"x"]), [], ErrorCode.BAD_KEY),
    ("key_as_str", header(keys=["k" * 32]), [], ErrorCode.BAD_KEY),
    ("key_as_int", header(keys=[KEY, 5]), [], ErrorCode.BAD_KEY),
    ("header_over_limit", header(pad=b"x" * DEFAULT_LIMITS.max_header_bytes), [],
     ErrorCode.HEADER_TOO_LARGE),
    ("put_without_vals", header(op="PUT"), [1], ErrorCode.MALFORMED_HEADER),
    ("put_vals_not_a_list", header(op="PUT", vals="x"), [1],
     ErrorCode.MALFORMED_HEADER),
    ("put_fewer_vals_than_keys", put_header([[1, 1, 0, {}]], keys=[KEY, KEY]), [1],
     ErrorCode.MALFORMED_HEADER),
    ("value_entry_not_a_list", put_header([1]), [1], ErrorCode.MALFORMED_HEADER),
    ("value_entry_of_3_fields", put_header([[1, 1, 0]]), [1], ErrorCode.MALFORMED_HEADER),
    ("value_entry_of_5_fields", put_header([[1, 1, 0, {}, 0]]), [1],
     ErrorCode.MALFORMED_HEADER),
    ("negative_size", put_header([[-1, 1, 0, {}]]), [1], ErrorCode.MALFORMED_HEADER),
    ("size_as_float", put_header([[1.0, 1, 0, {}]]), [1], ErrorCode.MALFORMED_HEADER),
    ("size_over_value_limit", put_header([[TOO_BIG, 33, 0, {}]]), [],
     ErrorCode.VALUE_TOO_LARGE),
    ("declared_size_1GiB", put_header([[1 << 30, 256, 0, {}]]), [], ErrorCode.VALUE_TOO_LARGE),
    ("request_over_1GiB_in_total",
     put_header([[128 * MiB, 32, 0, {}]] * 9), [], ErrorCode.VALUE_TOO_LARGE),
    ("negative_frames", put_header([[1, -1, 0, {}]]), [1], ErrorCode.MALFORMED_HEADER),
    ("frames_as_string", put_header([[1, "1", 0, {}]]), [1], ErrorCode.MALFORMED_HEADER),
    ("too_few_frames_for_size", put_header([[FRAME + 1, 1, 0, {}]]), [FRAME + 1],
     ErrorCode.FRAME_MISMATCH),
    ("more_frames_than_bytes", put_header([[2, 3, 0, {}]]), [1, 1, 0], ErrorCode.FRAME_MISMATCH),
    ("empty_value_in_one_frame", put_header([[0, 1, 0, {}]]), [0], ErrorCode.FRAME_MISMATCH),
    ("fewer_payload_frames_than_declared", put_header([[10, 2, 0, {}]]), [10],
     ErrorCode.FRAME_MISMATCH),
    ("more_payload_frames_than_declared", put_header([[10, 1, 0, {}]]), [10, 1],
     ErrorCode.FRAME_MISMATCH),
    ("payload_shorter_than_size", put_header([[10, 1, 0, {}]]), [9], ErrorCode.FRAME_MISMATCH),
    ("empty_frame_inside_value", put_header([[10, 2, 0, {}]]), [10, 0],
     ErrorCode.FRAME_MISMATCH),
    ("frame_over_frame_limit", put_header([[FRAME + 2, 2, 0, {}]]), [FRAME + 1, 1],
     ErrorCode.FRAME_MISMATCH),
    ("negative_checksum", put_header([[1, 1, -1, {}]]), [1], ErrorCode.MALFORMED_HEADER),
    ("checksum_over_64_bits", put_header([[1, 1, 2.0**70, {}]]), [1],
     ErrorCode.MALFORMED_HEADER),
    ("checksum_as_bytes", put_header([[1, 1, b"\x00" * 8, {}]]), [1],
     ErrorCode.MALFORMED_HEADER),
    ("meta_not_a_map", put_header([[1, 1, 0, [1, 2]]]), [1], ErrorCode.MALFORMED_HEADER),
    ("meta_of_17_entries", put_header([[1, 1, 0, {f"m{i}": i for i in range(17)}]]), [1],
     ErrorCode.MALFORMED_HEADER),
    ("get_with_payload_frames", header(), [5], ErrorCode.FRAME_MISMATCH),
    ("contains_with_payload_frames", header(op="CONTAINS"), [0], ErrorCode.FRAME_MISMATCH),
    ("ping_with_payload_frames", header(op="PING", keys=...), [1], ErrorCode.FRAME_MISMATCH),
    ("stats_with_payload_frames", header(op="STATS", keys=...), [1, 2],
     ErrorCode.FRAME_MISMATCH),
]  # fmt: skip


@pytest.mark.parametrize(
    ("header_bytes", "frame_sizes", "code"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_malformed_request_is_refused_with_its_code(header_bytes, frame_sizes, code):
    assert code_of(parse_request, header_bytes, frame_sizes) is code


def test_every_request_error_code_has_a_case():
    # INTERNAL is the node's own failure; parsing never raises it.
    covered = {case[3] for case in BAD_REQUESTS} | {ErrorCode.TOO_MANY_KEYS}
    assert covered == set(ErrorCode) - {ErrorCode.INTERNAL}


@pytest.mark.parametrize("count", [DEFAULT_LIMITS.max_keys + 1, 10_000])
def test_too_many_keys_is_refused_as_too_many_keys(count):
    assert code_of(parse_request, header(keys=make_keys(count)), []) is ErrorCode.TOO_MANY_KEYS


def test_too_many_keys_is_refused_before_any_key_is_checked_under_small_limits():
    limits = Limits(max_keys=8)
    keys = [b"short"] * 9
    assert code_of(parse_request, header(keys=keys), [], limits) is ErrorCode.TOO_MANY_KEYS


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_version_of_another_type_than_int_is_unsupported(version):
    assert code_of(decode_header, header(v=version)) is ErrorCode.UNSUPPORTED_VERSION


def test_errors_are_checked_in_order_version_before_op_before_keys():
    bad_everything = header(v=2, id=-1, op="NOPE", keys=[b"short"])
    assert code_of(parse_request, bad_everything, []) is ErrorCode.UNSUPPORTED_VERSION
    assert code_of(parse_request, header(id=-1, op="NOPE"), []) is ErrorCode.MALFORMED_HEADER
    assert code_of(parse_request, header(op="NOPE", keys=[b"x"]), []) is ErrorCode.UNKNOWN_OP


# ---- limits at their exact edges -----------------------------------------------------------


def test_exactly_max_keys_is_accepted():
    keys = make_keys(DEFAULT_LIMITS.max_keys)
    assert parse_request(header(keys=keys), []).keys == keys


def test_header_of_exactly_the_limit_is_not_too_large():
    limit = 4096
    limits = Limits(max_header_bytes=limit)
    base = len(header(op="PING", keys=..., pad=b""))  # the pad's bin8 prefix is 2 bytes
    pad = limit - base - 1  # a pad of more than 255 bytes takes a 3-byte bin16 prefix
    padded = header(op="PING", keys=..., pad=b"x" * pad)
    assert len(padded) == limit
    assert parse_request(padded, [], limits).op is Op.PING
    over = header(op="PING", keys=..., pad=b"x" * (pad + 1))
    assert len(over) == limit + 1
    assert code_of(parse_request, over, [], limits) is ErrorCode.HEADER_TOO_LARGE


def test_value_of_exactly_the_value_limit_is_accepted_one_more_byte_is_not():
    size = DEFAULT_LIMITS.max_value_bytes
    frames = frames_needed(size, FRAME)
    request = parse_request(put_header([[size, frames, 0, {}]]), [FRAME] * frames)
    assert request.values[0].size == size
    over = put_header([[size + 1, frames + 1, 0, {}]])
    assert code_of(parse_request, over, [FRAME] * frames + [1]) is ErrorCode.VALUE_TOO_LARGE


def test_request_of_exactly_the_request_limit_is_accepted():
    count = DEFAULT_LIMITS.max_request_bytes // DEFAULT_LIMITS.max_value_bytes
    frames = frames_needed(DEFAULT_LIMITS.max_value_bytes, FRAME)
    vals = [[DEFAULT_LIMITS.max_value_bytes, frames, 0, {}]] * count
    request = parse_request(put_header(vals, keys=make_keys(count)), [FRAME] * (frames * count))
    assert sum(v.size for v in request.values) == DEFAULT_LIMITS.max_request_bytes


def test_frame_of_exactly_the_frame_limit_is_accepted():
    request = parse_request(put_header([[FRAME, 1, 0, {}]]), [FRAME])
    assert request.values[0].frames == 1


def test_meta_of_exactly_the_entry_limit_is_accepted():
    meta = {f"m{i}": i for i in range(DEFAULT_LIMITS.max_meta_entries)}
    assert parse_request(put_header([[1, 1, 0, meta]]), [1]).values[0].meta == meta


def test_empty_value_travels_in_zero_frames():
    assert parse_request(put_header([[0, 0, 0, {}]]), []).values == [ValueInfo(0, 0, 0, {})]


def test_one_byte_per_frame_is_the_most_frames_a_value_may_use():
    assert parse_request(put_header([[3, 3, 0, {}]]), [1, 1, 1]).values[0].frames == 3


def test_max_message_part_covers_the_header_and_frame_limits():
    assert DEFAULT_LIMITS.max_message_part == max(1 << 20, 4 << 20)
    assert Limits(max_header_bytes=8 << 20).max_message_part == 8 << 20


@pytest.mark.parametrize(
    ("size", "step", "count"), [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3)]
)
def test_frames_needed_rounds_up(size, step, count):
    assert frames_needed(size, step) == count


# ---- check_payload_frames directly ---------------------------------------------------------


def test_payload_frames_skip_misses_and_follow_values_in_order():
    values = [ValueInfo(3, 1, 0), None, ValueInfo(5, 2, 0), None]
    check_payload_frames(values, [3, 2, 3], DEFAULT_LIMITS)
    with pytest.raises(ProtocolError) as info:
        check_payload_frames(values, [2, 3, 3], DEFAULT_LIMITS)  # right count, wrong split
    assert info.value.code is ErrorCode.FRAME_MISMATCH


def test_payload_frame_over_the_frame_limit_is_a_mismatch():
    limits = Limits(max_frame_bytes=4)
    with pytest.raises(ProtocolError) as info:
        check_payload_frames([ValueInfo(5, 1, 0)], [5], limits)
    assert info.value.code is ErrorCode.FRAME_MISMATCH


# ---- peek_id -------------------------------------------------------------------------------


def test_peek_id_names_a_request_that_failed_after_its_id_was_readable():
    assert peek_id(header(id=123, op="EXPLODE")) == 123
    assert peek_id(header(id=(1 << 64) - 1, v=9)) == (1 << 64) - 1


@pytest.mark.parametrize(
    "raw",
    [b"", b"\xc1", pack([1, 2]), header(id=-1), header(id=True), header(id="1"), header(id=...)],
    ids=["empty", "not_msgpack", "array", "negative", "bool", "string", "missing"],
)
def test_peek_id_is_none_when_no_valid_id_can_be_read(raw):
    assert peek_id(raw) is None


def test_peek_id_gives_up_on_a_header_over_the_limit():
    assert peek_id(header(pad=b"x" * 100), Limits(max_header_bytes=64)) is None


# ---- property: nothing but ProtocolError ---------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=256), frame_sizes=st.lists(st.integers(0, 1 << 24), max_size=4))
def test_random_bytes_as_a_header_raise_only_protocol_errors(raw, frame_sizes):
    try:
        decode_header(raw)
    except ProtocolError:
        pass
    try:
        parse_request(raw, frame_sizes)
    except ProtocolError:
        pass
    peek_id(raw)  # never raises


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=20,
)
header_maps = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), msgpack_values),
        "id": st.one_of(st.integers(0, 10), msgpack_values),
        "op": st.one_of(st.sampled_from([str(op) for op in Op]), msgpack_values),
        "keys": st.one_of(
            st.lists(st.binary(min_size=31, max_size=33), max_size=3), msgpack_values
        ),
        "vals": st.one_of(
            st.lists(
                st.lists(st.one_of(st.integers(-2, 10), msgpack_values), min_size=3, max_size=5),
                max_size=3,
            ),
            msgpack_values,
        ),
    },
)


@settings(max_examples=300, deadline=None)
@given(
    decoded=header_maps,
    frame_sizes=st.lists(st.integers(0, 12), max_size=4),
)
def test_random_header_maps_parse_or_raise_only_protocol_errors(decoded, frame_sizes):
    raw = pack(decoded)
    try:
        request = parse_request(raw, frame_sizes)
    except ProtocolError as error:
        assert error.code in set(ErrorCode) - {ErrorCode.INTERNAL}
    else:
        assert request.op in set(Op)
        assert (request.op in KEYED_OPS) or not frame_sizes
        assert parse_request(request.encode(), frame_sizes) == request


@settings(max_examples=200, deadline=None)
@given(
    decoded=st.dictionaries(st.sampled_from(["id", "code", "flags", "vals", "stats"]),
                            msgpack_values),
    op=st.sampled_from(list(Op)),
    frame_sizes=st.lists(st.integers(0, 12), max_size=3),
)  # fmt: skip
def test_random_replies_parse_or_raise_only_protocol_errors(decoded, op, frame_sizes):
    request = Request(op, 1, make_keys(2) if op in KEYED_OPS else [])
    try:
        parse_reply(decoded, frame_sizes, request)
    except ProtocolError:
        pass
