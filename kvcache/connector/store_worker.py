"""Stores newly computed chunks off the request's path: encode, keep locally, put to the cluster.

A bounded queue between the engine and one worker thread: when it is full the chunk is dropped
and counted (a slow or dead cluster costs future hits, never the current request's latency), and
any error in the worker is counted, never raised into the engine.
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
        capacity: int,
    ) -> None:
        """`sink(keys, blobs)` stores a batch and returns the bytes it moved."""
        self._encode = encode
        self._sink = sink
        self._queue: queue.Queue[tuple[list[bytes], list[torch.Tensor]] | None] = queue.Queue(
            maxsize=capacity
        )
        self.stats = StoreStats()
        self._thread = threading.Thread(target=self._run, name="kvcache-store", daemon=True)
        self._thread.start()

    def submit(self, keys: list[bytes], chunks: list[torch.Tensor]) -> bool:
        """Queue one request's new chunks (CPU tensors the caller no longer writes); False if
        the queue was full and they were dropped."""
        self.stats.submitted += len(keys)
        try:
            self._queue.put_nowait((keys, chunks))
        except queue.Full:
            self.stats.dropped += len(keys)
            return False
        return True

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is stored or failed (for demos and tests)."""
        done = threading.Event()
        threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True).start()
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return  # the daemon thread dies with the process
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._store(*item)
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
