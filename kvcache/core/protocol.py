"""The wire protocol between clients and cache nodes: typed messages, limits, encode and parse.

One request is one ZeroMQ multipart message: frame 0 is a msgpack header, frames 1..n are the raw
payloads of the values it carries, each value split into one or more frames (libzmq allocates one
buffer per message part, so large values travel as many ~2 MiB parts). Replies have the same shape.

This module never touches a socket: it turns header bytes and payload frame sizes into typed
messages and back, and raises `ProtocolError` (with a stable code) on anything malformed, so both
the node and the client enforce the same limits from one place.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvcache.core.errors import ErrorCode, ProtocolError
from kvcache.core.keys import KEY_BYTES

PROTOCOL_VERSION = 1


class Op(enum.StrEnum):
    PUT = "PUT"
    GET = "GET"
    CONTAINS = "CONTAINS"
    DELETE = "DELETE"
    STATS = "STATS"
    PING = "PING"


KEYED_OPS = frozenset({Op.PUT, Op.GET, Op.CONTAINS, Op.DELETE})
_OPS_BY_NAME = {str(op): op for op in Op}  # a dict lookup per request, not an Enum call


@dataclass(frozen=True)
class Limits:
    """Hard limits enforced by both sides; a node rejects, a client refuses to send."""

    max_header_bytes: int = 1 << 20
    max_keys: int = 4096
    max_value_bytes: int = 128 << 20
    max_frame_bytes: int = 4 << 20
    max_request_bytes: int = 1 << 30
    max_meta_entries: int = 16
    # Small enough that a GET reply's header for max_keys values always fits max_header_bytes.
    max_meta_bytes: int = 128

    @property
    def max_message_part(self) -> int:
        """The largest single part libzmq may accept (ZMQ_MAXMSGSIZE)."""
        return max(self.max_header_bytes, self.max_frame_bytes)


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ValueInfo:
    """What travels in the header about one value: its size, how many frames carry it, its
    checksum (computed by the writer, stored with the value, verified by the reader), and small
    metadata such as the chunk's depth in its prefix chain."""

    size: int
    frames: int
    checksum: int
    meta: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> list[Any]:
        return [self.size, self.frames, self.checksum, self.meta]


@dataclass(frozen=True)
class Request:
    op: Op
    id: int
    keys: list[bytes] = field(default_factory=list)
    values: list[ValueInfo] = field(default_factory=list)  # PUT only, one per key

    def encode(self) -> bytes:
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": self.id, "op": str(self.op)}
        if self.op in KEYED_OPS:
            header["keys"] = self.keys
        if self.op is Op.PUT:
            header["vals"] = [value.to_wire() for value in self.values]
        return msgpack.packb(header, use_bin_type=True)


@dataclass(frozen=True)
class Reply:
    """A node's answer. On error `code` and `message` are set and nothing else is meaningful.

    `flags` answers PUT (stored), CONTAINS (present) and DELETE (deleted) per key; `values`
    answers GET per key (None is a miss) and is followed by the found values' frames in order."""

    id: int | None
    code: ErrorCode | None = None
    message: str = ""
    flags: list[bool] = field(default_factory=list)
    values: list[ValueInfo | None] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code is None

    def encode(self) -> bytes:
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": self.id}
        if self.code is not None:
            header["code"] = str(self.code)
            header["msg"] = self.message
            return msgpack.packb(header, use_bin_type=True)
        if self.flags:
            header["flags"] = self.flags
        if self.values:
            header["vals"] = [None if v is None else v.to_wire() for v in self.values]
        if self.stats:
            header["stats"] = self.stats
        return msgpack.packb(header, use_bin_type=True)


def error_reply(request_id: int | None, error: ProtocolError) -> Reply:
    return Reply(id=request_id, code=error.code, message=error.message)


def frames_needed(size: int, frame_bytes: int) -> int:
    """How many frames carry a value of `size` bytes when split at `frame_bytes`."""
    return math.ceil(size / frame_bytes)


def _unpack_map(header: bytes | memoryview, limits: Limits) -> dict[str, Any]:
    if len(header) > limits.max_header_bytes:
        raise ProtocolError(
            ErrorCode.HEADER_TOO_LARGE,
            f"header is {len(header)} bytes, limit {limits.max_header_bytes}",
        )
    try:
        decoded = msgpack.unpackb(
            header,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_header_bytes,
            max_str_len=limits.max_header_bytes,
            max_array_len=limits.max_header_bytes,  # bounded by bytes; key count checked after
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise ProtocolError(ErrorCode.MALFORMED_HEADER, f"header is not msgpack: {exc}") from None
    if not isinstance(decoded, dict):
        raise ProtocolError(ErrorCode.MALFORMED_HEADER, "header must be a msgpack map")
    return decoded


def decode_header(header: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Unpack a header within the limits and check its protocol version."""
    decoded = _unpack_map(header, limits)
    version = decoded.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported; this side speaks {PROTOCOL_VERSION}",
        )
    return decoded


def peek_id(header: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> int | None:
    """Best effort: the id of a message whose full parse failed, so an error reply can name it."""
    try:
        message_id = _unpack_map(header, limits).get("id")
    except ProtocolError:
        return None
    return message_id if type(message_id) is int and 0 <= message_id < 1 << 64 else None


def _message_id(header: dict[str, Any]) -> int:
    message_id = header.get("id")
    if type(message_id) is not int or not 0 <= message_id < 1 << 64:
        raise ProtocolError(ErrorCode.MALFORMED_HEADER, "id must be an unsigned 64-bit integer")
    return message_id


def _keys(header: dict[str, Any], limits: Limits) -> list[bytes]:
    keys = header.get("keys")
    if not isinstance(keys, list):
        raise ProtocolError(ErrorCode.MALFORMED_HEADER, "keys must be a list of binary keys")
    if len(keys) > limits.max_keys:
        raise ProtocolError(
            ErrorCode.TOO_MANY_KEYS, f"{len(keys)} keys in one request, limit {limits.max_keys}"
        )
    for index, key in enumerate(keys):
        if type(key) is not bytes or len(key) != KEY_BYTES:
            raise ProtocolError(
                ErrorCode.BAD_KEY, f"key {index} must be {KEY_BYTES} bytes of binary"
            )
    return keys


_META_SCALARS = (type(None), bool, int, float, str, bytes)


def check_meta(meta: Any, limits: Limits, where: str = "meta") -> None:
    """A value's metadata must be a small flat map of scalars: it rides in every GET reply's
    header, and a node holds it as Python objects for as long as the value lives. Nested lists
    or maps cost one byte each packed but ~60 bytes held, which no fixed charge could cover."""
    if not isinstance(meta, dict) or len(meta) > limits.max_meta_entries:
        raise ProtocolError(
            ErrorCode.MALFORMED_HEADER,
            f"{where}: meta must be a map of at most {limits.max_meta_entries} entries",
        )
    if not all(type(k) is str and type(v) in _META_SCALARS for k, v in meta.items()):
        raise ProtocolError(
            ErrorCode.MALFORMED_HEADER,
            f"{where}: meta maps names to scalars (nil, bool, int, float, str, bin)",
        )
    if meta and len(msgpack.packb(meta, use_bin_type=True)) > limits.max_meta_bytes:
        raise ProtocolError(
            ErrorCode.MALFORMED_HEADER,
            f"{where}: meta is over {limits.max_meta_bytes} bytes packed",
        )


def _value_info(raw: Any, index: int, limits: Limits) -> ValueInfo:
    if not isinstance(raw, list) or len(raw) != 4:
        raise ProtocolError(
            ErrorCode.MALFORMED_HEADER, f"value {index} must be [size, frames, checksum, meta]"
        )
    size, frames, checksum, meta = raw
    if type(size) is not int or size < 0:
        raise ProtocolError(ErrorCode.MALFORMED_HEADER, f"value {index}: size must be an int >= 0")
    if size > limits.max_value_bytes:
        raise ProtocolError(
            ErrorCode.VALUE_TOO_LARGE,
            f"value {index} is {size} bytes, limit {limits.max_value_bytes}",
        )
    if type(frames) is not int or frames < 0:
        raise ProtocolError(ErrorCode.MALFORMED_HEADER, f"value {index}: frames must be an int")
    if (
        frames < frames_needed(size, limits.max_frame_bytes)
        or frames > max(size, 0)
        or (size > 0 and frames == 0)
    ):
        raise ProtocolError(
            ErrorCode.FRAME_MISMATCH, f"value {index}: {frames} frames cannot carry {size} bytes"
        )
    if type(checksum) is not int or not 0 <= checksum < 1 << 64:
        raise ProtocolError(
            ErrorCode.MALFORMED_HEADER, f"value {index}: checksum must be an unsigned 64-bit int"
        )
    check_meta(meta, limits, f"value {index}")
    return ValueInfo(size=size, frames=frames, checksum=checksum, meta=meta)


def check_payload_frames(
    values: Sequence[ValueInfo | None], frame_sizes: Sequence[int], limits: Limits
) -> None:
    """Check that the payload frames that follow a header carry exactly the declared values."""
    declared = sum(value.frames for value in values if value is not None)
    if declared != len(frame_sizes):
        raise ProtocolError(
            ErrorCode.FRAME_MISMATCH,
            f"header declares {declared} payload frames, message has {len(frame_sizes)}",
        )
    position = 0
    for index, value in enumerate(values):
        if value is None:
            continue
        sizes = frame_sizes[position : position + value.frames]
        position += value.frames
        if sum(sizes) != value.size or any(size > limits.max_frame_bytes for size in sizes):
            raise ProtocolError(
                ErrorCode.FRAME_MISMATCH,
                f"value {index}: frames of {list(sizes)[:4]}... bytes do not make {value.size}",
            )
        if value.size and min(sizes) == 0:
            raise ProtocolError(ErrorCode.FRAME_MISMATCH, f"value {index}: empty payload frame")


def parse_request(
    header: bytes | memoryview, frame_sizes: Sequence[int], limits: Limits = DEFAULT_LIMITS
) -> Request:
    """Validate a request completely before the node acts on any part of it."""
    decoded = decode_header(header, limits)
    message_id = _message_id(decoded)
    name = decoded.get("op")
    op = _OPS_BY_NAME.get(name) if isinstance(name, str) else None
    if op is None:
        raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {name!r}")
    if op not in KEYED_OPS:
        if frame_sizes:
            raise ProtocolError(ErrorCode.FRAME_MISMATCH, f"{op} carries no payload frames")
        return Request(op=op, id=message_id)
    keys = _keys(decoded, limits)
    values: list[ValueInfo] = []
    if op is Op.PUT:
        raw_values = decoded.get("vals")
        if not isinstance(raw_values, list) or len(raw_values) != len(keys):
            raise ProtocolError(ErrorCode.MALFORMED_HEADER, "PUT needs one value entry per key")
        values = [_value_info(raw, index, limits) for index, raw in enumerate(raw_values)]
        total = sum(value.size for value in values)
        if total > limits.max_request_bytes:
            raise ProtocolError(
                ErrorCode.VALUE_TOO_LARGE,
                f"request carries {total} bytes, limit {limits.max_request_bytes}",
            )
    check_payload_frames(values, frame_sizes, limits)
    return Request(op=op, id=message_id, keys=keys, values=values)


def parse_reply(
    decoded: dict[str, Any],
    frame_sizes: Sequence[int],
    request: Request,
    limits: Limits = DEFAULT_LIMITS,
) -> Reply:
    """Validate a node's reply to `request` (its header already through `decode_header`);
    a reply that does not fit the request raises ProtocolError."""
    reply_id = decoded.get("id")
    if "code" in decoded:
        try:
            code = ErrorCode(decoded["code"])
        except ValueError:
            code = ErrorCode.INTERNAL
        return Reply(id=reply_id, code=code, message=str(decoded.get("msg", "")))
    if reply_id != request.id:
        raise ProtocolError(ErrorCode.MALFORMED_HEADER, f"reply id {reply_id} is not {request.id}")
    count = len(request.keys)
    if request.op in (Op.PUT, Op.CONTAINS, Op.DELETE):
        flags = decoded.get("flags", [])
        if not isinstance(flags, list) or len(flags) != count:
            raise ProtocolError(ErrorCode.MALFORMED_HEADER, f"reply needs {count} flags")
        if frame_sizes:
            raise ProtocolError(ErrorCode.FRAME_MISMATCH, "this reply carries no payload frames")
        return Reply(id=reply_id, flags=[flag is True for flag in flags])
    if request.op is Op.GET:
        raw_values = decoded.get("vals", [])
        if not isinstance(raw_values, list) or len(raw_values) != count:
            raise ProtocolError(ErrorCode.MALFORMED_HEADER, f"reply needs {count} value entries")
        values = [
            None if raw is None else _value_info(raw, index, limits)
            for index, raw in enumerate(raw_values)
        ]
        check_payload_frames(values, frame_sizes, limits)
        return Reply(id=reply_id, values=values)
    stats = decoded.get("stats", {})
    return Reply(id=reply_id, stats=stats if isinstance(stats, dict) else {})
