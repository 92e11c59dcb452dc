"""The disk tier: values evicted from memory, one verified file each, under a byte budget.

Layout: `<dir>/<first two hex digits of the key>/<key hex>.kv`, one record per file:

    prefix   magic, format version, flags (1 = encrypted), header length, body length
    checksum XXH3-64 of the prefix, the header and the nonce: the "head checksum"
    header   msgpack [key, size, frames, checksum, meta, written_ns]
    nonce    12 bytes, encrypted records only
    body     the payload, or its AES-256-GCM ciphertext and tag (associated data: prefix + header,
             which holds the chunk key, so a record cannot pass for another key's)

The index is rebuilt at start from the heads alone (one small read per file), and the policy is
told of the records in the order they were written (file times are too coarse for that). The body
is checked on every read: the file must be exactly as long as its prefix says, the GCM tag must
verify, and the payload must match the value's own XXH3-64 checksum. A record that fails any
check is a miss, is counted in `corrupt_dropped`, and its file is removed: this tier never returns
wrong bytes.

A record is written to `<key hex>.tmp` and renamed to its final name only when complete, so a
process killed mid-write leaves at most a temp file, which the next start removes. There is no
fsync: this is a cache, a power loss may lose or tear the newest records, and the checks above turn
those into misses; an fsync per record would cost milliseconds on the node's event loop.

File system errors (a full disk, EFBIG, EIO) are counted and answered as "not stored" or a miss,
never raised. Nothing here logs on the data path. One process owns a directory (an flock).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import msgpack
import xxhash

from kvcache.cachenode.at_rest import NONCE_BYTES, TAG_BYTES, AtRestCipher
from kvcache.cachenode.eviction import EvictionPolicy, LRUPolicy
from kvcache.cachenode.memory_tier import StoredValue
from kvcache.core.checksum import checksum
from kvcache.core.keys import KEY_BYTES
from kvcache.core.protocol import ValueInfo

log = logging.getLogger(__name__)

MAGIC = b"kvcdisk\x00"
FORMAT_VERSION = 1
FLAG_ENCRYPTED = 1
# magic, version, flags, header length, body length; then the head checksum.
PREFIX = struct.Struct("<8sBB2xIQ")
HEAD_CHECKSUM = struct.Struct("<Q")
HEAD_READ_BYTES = 4096  # one read at start gets the whole head of any record
MAX_HEADER_BYTES = HEAD_READ_BYTES - PREFIX.size - HEAD_CHECKSUM.size - NONCE_BYTES
BLOCK_BYTES = 4096  # a file is charged its size in whole blocks, as the file system spends it
RECORD_SUFFIX = ".kv"
TEMP_SUFFIX = ".tmp"
LOCK_NAME = "lock"


@dataclass(frozen=True)
class DiskRecord:
    """What the index holds about one record file; the payload stays on disk."""

    info: ValueInfo
    file_bytes: int

    @property
    def charged_bytes(self) -> int:
        return -(-self.file_bytes // BLOCK_BYTES) * BLOCK_BYTES


@dataclass(frozen=True)
class _Head:
    key: bytes
    info: ValueInfo
    written_ns: int
    nonce: bytes
    associated: bytes  # what GCM authenticates besides the body: prefix and header
    body_offset: int
    body_bytes: int

    @property
    def file_bytes(self) -> int:
        return self.body_offset + self.body_bytes


def _same_value(a: ValueInfo, b: ValueInfo) -> bool:
    return a.size == b.size and a.checksum == b.checksum


def _decode_header(header: Any) -> tuple[bytes, ValueInfo, int] | None:
    try:
        fields = msgpack.unpackb(header, raw=False, strict_map_key=False)
    except ValueError:  # every msgpack decoding error is a ValueError
        return None
    if not isinstance(fields, list) or len(fields) != 6:
        return None
    key, size, frames, value_checksum, meta, written_ns = fields
    if not (
        type(key) is bytes
        and len(key) == KEY_BYTES
        and type(size) is int
        and type(frames) is int
        and type(value_checksum) is int
        and isinstance(meta, dict)
        and type(written_ns) is int
        and size >= 0
        and 0 <= frames <= max(size, 1)
    ):
        return None
    info = ValueInfo(size=size, frames=frames, checksum=value_checksum, meta=meta)
    return key, info, written_ns


def _parse_head(data: memoryview, encrypted: bool) -> _Head | None:
    """The head at the start of `data`, or None unless it is a whole, intact head of a record in
    this tier's mode (a plaintext record is never read by an encrypting tier, nor the reverse)."""
    fixed = PREFIX.size + HEAD_CHECKSUM.size
    if len(data) < fixed:
        return None
    magic, version, flags, header_bytes, body_bytes = PREFIX.unpack_from(data)
    if magic != MAGIC or version != FORMAT_VERSION or flags != (FLAG_ENCRYPTED if encrypted else 0):
        return None
    nonce_bytes = NONCE_BYTES if encrypted else 0
    if header_bytes > MAX_HEADER_BYTES or len(data) < fixed + header_bytes + nonce_bytes:
        return None
    (stored_checksum,) = HEAD_CHECKSUM.unpack_from(data, PREFIX.size)
    header = data[fixed : fixed + header_bytes]
    nonce = data[fixed + header_bytes : fixed + header_bytes + nonce_bytes]
    state = xxhash.xxh3_64(data[: PREFIX.size])
    state.update(header)
    state.update(nonce)
    if state.intdigest() != stored_checksum:
        return None
    decoded = _decode_header(header)
    if decoded is None:
        return None
    key, info, written_ns = decoded
    if body_bytes != info.size + (TAG_BYTES if encrypted else 0):
        return None
    associated = bytes(data[: PREFIX.size]) + bytes(header)
    body_offset = fixed + header_bytes + nonce_bytes
    return _Head(key, info, written_ns, bytes(nonce), associated, body_offset, body_bytes)


def _frames(payload: memoryview, info: ValueInfo) -> tuple[tuple[memoryview, ...], ValueInfo]:
    """The payload cut into about as many frames as it arrived in, none larger than the largest
    arriving frame could have been, so a GET reply passes the same frame limits as the PUT."""
    if info.size == 0:
        return (), replace(info, frames=0)
    step = -(-info.size // max(info.frames, 1))
    frames = tuple(payload[start : start + step] for start in range(0, info.size, step))
    return frames, info if len(frames) == info.frames else replace(info, frames=len(frames))


def _write_file(path: str, buffers: Sequence[Any]) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for buffer in buffers:
            view = memoryview(buffer)
            while view:  # a short write happens right before ENOSPC or EFBIG
                view = view[os.write(descriptor, view) :]
    finally:
        os.close(descriptor)


def _remove(path: str) -> None:
    """Unlink, tolerating any failure: a file left behind is found and checked at next start."""
    with contextlib.suppress(OSError):
        os.unlink(path)


class DiskTier:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        budget_bytes: int,
        policy: EvictionPolicy | None = None,
        cipher: AtRestCipher | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.directory = os.fspath(directory)
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.writes = 0  # records written (spills and values too large for memory)
        self.hits = 0
        self.evictions = 0
        self.write_errors = 0  # writes the file system refused: full disk, EFBIG, EIO, ...
        self.corrupt_dropped = 0  # records that failed a check on read or at start, removed
        self.rejected = 0  # larger than the whole budget, or not matching their checksum
        self._cipher = cipher
        self._policy: EvictionPolicy = policy if policy is not None else LRUPolicy()
        self._index: dict[bytes, DiskRecord] = {}
        os.makedirs(self.directory, exist_ok=True)
        self._lock = os.open(
            os.path.join(self.directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise RuntimeError(f"{self.directory} is in use by another disk tier") from None
        self._rebuild()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def close(self) -> None:
        """Release the directory for another process; the records stay for the next start.
        Closing twice is harmless."""
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def delete_unless_same(self, key: bytes, info: ValueInfo) -> None:
        """Remove the record under `key` unless it holds the value `info` describes."""
        record = self._index.get(key)
        if record is not None and not _same_value(record.info, info):
            self._drop(key)

    def spill(self, key: bytes, value: StoredValue) -> None:
        """The memory tier's eviction callback."""
        self.put(key, value.frames, value.info)

    def put(self, key: bytes, frames: Sequence[Any], info: ValueInfo) -> bool:
        """Write a value's record, evicting as needed; False when it is not on disk afterwards."""
        held = self._index.get(key)
        if held is not None and _same_value(held.info, info):
            self._policy.accessed(key)  # already on disk (a promoted value evicted again)
            return True
        self.delete(key)
        if checksum(frames) != info.checksum:  # could never be served: reads verify it
            self.rejected += 1
            return False
        header = msgpack.packb(
            [key, info.size, info.frames, info.checksum, info.meta, time.time_ns()],
            use_bin_type=True,
        )
        encrypted = self._cipher is not None
        body_bytes = info.size + (TAG_BYTES if encrypted else 0)
        head_bytes = PREFIX.size + HEAD_CHECKSUM.size + len(header)
        record = DiskRecord(info, head_bytes + (NONCE_BYTES if encrypted else 0) + body_bytes)
        charge = record.charged_bytes
        if charge > self.budget_bytes or len(header) > MAX_HEADER_BYTES:
            self.rejected += 1
            return False
        while self.used_bytes + charge > self.budget_bytes:
            victim = self._policy.victim()
            if victim is None:  # unreachable while the accounting is right; never loop forever
                return False
            self._drop(victim)
            self.evictions += 1
        path = self._path(key)
        temp = path[: -len(RECORD_SUFFIX)] + TEMP_SUFFIX
        try:
            _write_file(temp, self._encode(header, frames, body_bytes))
            os.rename(temp, path)
        except OSError:
            self.write_errors += 1
            _remove(temp)
            return False
        self._index[key] = record
        self.used_bytes += charge
        self._policy.inserted(key, info.meta)
        self.writes += 1
        return True

    def get(self, key: bytes) -> StoredValue | None:
        """The value, read and verified; a record that fails a check is removed and missed."""
        record = self._index.get(key)
        if record is None:
            return None
        value = self._read(key, record)
        if value is None:
            self.corrupt_dropped += 1
            self._drop(key)
            return None
        self.hits += 1
        self._policy.accessed(key)
        return value

    def delete(self, key: bytes) -> bool:
        if key not in self._index:
            return False
        self._drop(key)
        return True

    def _path(self, key: bytes) -> str:
        name = key.hex()
        return f"{self.directory}/{name[:2]}/{name}{RECORD_SUFFIX}"

    def _drop(self, key: bytes) -> None:
        record = self._index.pop(key)
        self.used_bytes -= record.charged_bytes
        self._policy.removed(key)
        _remove(self._path(key))

    def _encode(self, header: bytes, frames: Sequence[Any], body_bytes: int) -> list[Any]:
        """The record as buffers to write: the head, then the body's frames or ciphertext."""
        encrypted = self._cipher is not None
        prefix = PREFIX.pack(
            MAGIC, FORMAT_VERSION, FLAG_ENCRYPTED if encrypted else 0, len(header), body_bytes
        )
        body: list[Any] = list(frames)
        nonce = b""
        if self._cipher is not None:
            nonce, ciphertext = self._cipher.seal(b"".join(frames), prefix + header)
            body = [ciphertext]
        head_checksum = xxhash.xxh3_64_intdigest(prefix + header + nonce)
        return [prefix + HEAD_CHECKSUM.pack(head_checksum) + header + nonce, *body]

    def _read(self, key: bytes, record: DiskRecord) -> StoredValue | None:
        # One byte more than expected, so a file that grew is caught as well as one that shrank.
        buffer = bytearray(record.file_bytes + 1)
        view = memoryview(buffer)
        filled = 0
        try:
            with open(self._path(key), "rb", buffering=0) as file:
                while filled < len(buffer):
                    count = file.readinto(view[filled:])
                    if not count:
                        break
                    filled += count
        except OSError:
            return None
        head = _parse_head(view[:filled], self._cipher is not None)
        if (
            head is None
            or head.key != key
            or head.file_bytes != filled
            or not _same_value(head.info, record.info)  # the file is the one the index knows
        ):
            return None
        body = view[head.body_offset : filled]
        if self._cipher is not None:
            plaintext = self._cipher.open(head.nonce, body, head.associated)
            if plaintext is None:
                return None
            body = memoryview(plaintext)
        if checksum([body]) != head.info.checksum:
            return None
        frames, info = _frames(body, head.info)
        return StoredValue(frames=frames, info=info)

    def _load_head(self, path: str) -> tuple[int, bytes, DiskRecord] | None:
        """(written_ns, key, record) of a record file whose head checks out, else None."""
        try:
            key = bytes.fromhex(os.path.basename(path)[: -len(RECORD_SUFFIX)])
            with open(path, "rb", buffering=0) as file:
                status = os.fstat(file.fileno())
                data = file.read(HEAD_READ_BYTES)
        except (OSError, ValueError):
            return None
        head = _parse_head(memoryview(data), self._cipher is not None)
        if (
            head is None
            or head.key != key
            or head.file_bytes != status.st_size
            or path != self._path(key)  # in its own shard, where reads will look for it
        ):
            return None
        return head.written_ns, key, DiskRecord(head.info, head.file_bytes)

    def _rebuild(self) -> None:
        """Index every intact record, oldest first so the policy sees them in their write
        order; remove temp files (writes a crash cut short) and records whose head is bad."""
        found: list[tuple[int, bytes, DiskRecord]] = []
        temps = 0
        for shard in range(256):
            shard_dir = f"{self.directory}/{shard:02x}"
            os.makedirs(shard_dir, exist_ok=True)
            with os.scandir(shard_dir) as entries:
                for entry in entries:
                    if entry.name.endswith(TEMP_SUFFIX):
                        _remove(entry.path)
                        temps += 1
                    elif entry.name.endswith(RECORD_SUFFIX):
                        loaded = self._load_head(entry.path)
                        if loaded is None:
                            _remove(entry.path)
                            self.corrupt_dropped += 1
                        else:
                            found.append(loaded)
        found.sort(key=lambda item: item[0])
        for _, key, record in found:
            self._index[key] = record
            self.used_bytes += record.charged_bytes
            self._policy.inserted(key, record.info.meta)
        while self.used_bytes > self.budget_bytes:  # the budget may have shrunk since
            victim = self._policy.victim()
            if victim is None:
                break
            self._drop(victim)
            self.evictions += 1
        log.info(
            "disk tier %s: %d records, %d bytes; removed %d temp files, %d bad records",
            self.directory,
            len(self._index),
            self.used_bytes,
            temps,
            self.corrupt_dropped,
        )
