"""The connector's host-memory tier: encoded chunks kept in the engine's own process.

It answers before the cluster does, so a prompt this engine saw recently moves no bytes over the
network (LMCache's local CPU backend plays the same part). A hard byte budget with LRU eviction
bounds it; a blob larger than the whole budget is not kept. A prompt's chunks are worth less
the deeper they sit (every reuse needs the first ones), so `put_chain` and `touch_chain` make a
chain's first chunk its most recent: eviction takes the deep end of a chain first. The store
worker writes while the engine reads, hence the lock.

`drain_changes` says which keys came and went since it was last called: vLLM's scheduler runs
apart from the worker that holds the tier, and keeps a mirror of its keys from these
(`connector.vllm`), so its lookups count what this tier would serve.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence


class LocalTier:
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._blobs: OrderedDict[bytes, bytes] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()
        self._changes: dict[bytes, bool] = {}  # key -> held, since the last drain

    @property
    def used_bytes(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._blobs)

    def get(self, key: bytes) -> bytes | None:
        with self._lock:
            blob = self._blobs.get(key)
            if blob is not None:
                self._blobs.move_to_end(key)
            return blob

    def put(self, key: bytes, blob: bytes) -> bool:
        """Keep `blob`, evicting the least recently used blobs to fit; False if it never can."""
        if len(blob) > self.budget_bytes:
            return False
        with self._lock:
            old = self._blobs.pop(key, None)
            if old is not None:
                self._used -= len(old)
            while self._used + len(blob) > self.budget_bytes:
                gone, evicted = self._blobs.popitem(last=False)
                self._used -= len(evicted)
                self._changes[gone] = False
            self._blobs[key] = blob
            self._used += len(blob)
            self._changes[key] = True
            return True

    def put_chain(self, keys: Sequence[bytes], blobs: Sequence[bytes]) -> None:
        """Keep a prefix chain's blobs, the first one most recent."""
        for key, blob in reversed(list(zip(keys, blobs))):
            self.put(key, blob)

    def touch_chain(self, keys: Sequence[bytes]) -> None:
        """Mark a chain used, the first key most recent."""
        with self._lock:
            for key in reversed(keys):
                if key in self._blobs:
                    self._blobs.move_to_end(key)

    def prefix_length(self, keys: Sequence[bytes]) -> int:
        """How many leading keys are held here."""
        with self._lock:
            return next((i for i, key in enumerate(keys) if key not in self._blobs), len(keys))

    def drain_changes(self) -> dict[bytes, bool]:
        """Keys put (True) or evicted (False) since the last call, the latest state of each."""
        with self._lock:
            changes, self._changes = self._changes, {}
            return changes
