"""Whether each engine hashes blocks as the router does: a block size, hash seed or hash
algorithm that differs from the engine's gives zero prefix matches, with nothing else to show it.

An engine's `BlockStored` events that start a prompt (no parent) name a block the router can
hash again from the event's own tokens. One such block hashed alike proves the settings agree;
`MISMATCH_AFTER` root blocks that all differ (or a block size that differs) say they do not,
and are logged once per engine. Root blocks of requests with a `cache_salt`, a LoRA adapter or
images carry extra keys the router does not hash, so a single miss proves nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvcache.router.block_hash import BlockHasher
from kvcache.router.kv_events import BlockStored, EventBatch

log = logging.getLogger(__name__)
MISMATCH_AFTER = 8


@dataclass
class _Engine:
    checked: int = 0
    matched: int = 0
    block_size: int | None = None  # the engine's, when it is not the router's
    reported: bool = False


class HashCheck:
    def __init__(self, hasher: BlockHasher) -> None:
        self._hasher = hasher
        self._engines: dict[str, _Engine] = {}

    def observe(self, engine: str, batch: EventBatch) -> None:
        state = self._engines.setdefault(engine, _Engine())
        if state.matched:
            return  # agreed: nothing more to learn
        for event in batch.events:
            if not isinstance(event, BlockStored) or event.parent_block_hash is not None:
                continue
            if not event.block_hashes or event.lora_id is not None:
                continue
            if event.block_size != self._hasher.block_size:
                state.block_size = event.block_size
            else:
                first = event.token_ids[: event.block_size]
                state.checked += 1
                state.matched += self._hasher.hashes(first) == [event.block_hashes[0]]
        if not state.reported and self.verdict(engine) == "mismatch":
            state.reported = True
            log.warning(
                "engine %s hashes blocks otherwise than the router (%s): no prefix will match "
                "there; run it with PYTHONHASHSEED=%s and --prefix-caching-hash-algo "
                "sha256_cbor, and give the router its block size (router.blockSize)",
                engine,
                f"block size {state.block_size}, the router's {self._hasher.block_size}"
                if state.block_size
                else f"{state.checked} first blocks hashed to other values",
                self._hasher.hash_seed,
            )

    def verdict(self, engine: str) -> str:
        """ "ok", "mismatch", or "unchecked" (no first block seen yet)."""
        state = self._engines.get(engine)
        if state is None:
            return "unchecked"
        if state.matched:
            return "ok"
        if state.block_size is not None or state.checked >= MISMATCH_AFTER:
            return "mismatch"
        return "unchecked"

    def forget(self, engine: str) -> None:
        self._engines.pop(engine, None)

    def verdicts(self) -> dict[str, str]:
        return {engine: self.verdict(engine) for engine in self._engines}
