"""Stores newly computed chunks off the request's path: encode, keep locally, put to the cluster.

A queue bounded in bytes between the engine and one worker thread (a count of requests would
let a burst of long prompts against a slow cluster hold the host's memory): what does not fit
is dropped and counted (a slow or dead cluster costs future hits, never the current request's
latency), and any error in the worker is counted, never raised into the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class StoreStats:
    submitted: int = 0
    dropped: int = 0
    stored: int = 0
    failed: int = 0
    bytes_stored: int = 0
    seconds: float = 0.0


class StoreWorker:
    def __init__(
        self,
        encode: Callable[[torch.Tensor], bytes],
        sink: Callable[[list[bytes], list[bytes]], int],
        capacity_bytes: int,
    ) -> None:
        """`sink(keys, blobs)` stores a batch and returns the bytes it moved; at most
        `capacity_bytes` of chunks wait (or are being stored) at once."""
        self._encode = encode
        self._sink = sink
        self.capacity_bytes = capacity_bytes
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[list[bytes], list[torch.Tensor]] | None] = queue.Queue()
        self.stats = StoreStats()
        self._thread = threading.Thread(target=self._run, name="kvcache-store", daemon=True)
        self._thread.start()

    def submit(self, keys: list[bytes], chunks: list[torch.Tensor]) -> bool:
        """Queue one request's new chunks (CPU tensors the caller no longer writes); False if
        they did not fit the byte budget and were dropped."""
        self.stats.submitted += len(keys)
        size = _nbytes(chunks)
        with self._lock:
            fits = self._queued_bytes + size <= self.capacity_bytes
            if fits:
                self._queued_bytes += size
        if not fits:
            self.stats.dropped += len(keys)
            return False
        self._queue.put_nowait((keys, chunks))
        return True

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is stored or failed (for demos and tests)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)  # a worker stuck on a dead cluster dies with the process

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._store(*item)
                with self._lock:
                    self._queued_bytes -= _nbytes(item[1])
            finally:
                self._queue.task_done()

    def _store(self, keys: list[bytes], chunks: list[torch.Tensor]) -> None:
        started = time.perf_counter()
        try:
            blobs = [self._encode(chunk) for chunk in chunks]
            self.stats.bytes_stored += self._sink(keys, blobs)
            self.stats.stored += len(keys)
        except Exception:  # noqa: BLE001 - the worker must outlive any one failure
            log.exception("storing %d chunks failed", len(keys))
            self.stats.failed += len(keys)
        self.stats.seconds += time.perf_counter() - started


def _nbytes(chunks: list[torch.Tensor]) -> int:
    return sum(chunk.numel() * chunk.element_size() for chunk in chunks)
