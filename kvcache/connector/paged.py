"""vLLM's paged KV cache on the CPU backend, read and written as the connector's KV tensors.

Each attention layer's cache is `[blocks, kv_heads, block_size, 2 * head_dim]`, which the CPU
attention backend views as `[blocks, kv_heads, 2 * block_size, head_dim]`: a block's keys are its
first `block_size` rows, its values the next. A token at position `p` of a request lives in block
`block_ids[p // block_size]` at offset `p % block_size`. This module moves a run of a request's
tokens between those pages and `[layers, 2, tokens, kv_heads, head_dim]`, the layout every codec
and the transformers adapter share, so KV stored by one engine loads into any other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PagedKV:
    def __init__(self, layers: Sequence[torch.Tensor], block_size: int) -> None:
        """`layers` are the per-layer caches in model order."""
        if not layers:
            raise ValueError("a paged KV cache needs at least one layer")
        self.block_size = block_size
        self._pages: list[torch.Tensor] = []
        for layer in layers:
            blocks, heads, rows, width = layer.shape
            if rows != block_size or width % 2:
                raise ValueError(
                    f"expected a CPU-backend layer [blocks, heads, {block_size}, 2 * head_dim], "
                    f"got {tuple(layer.shape)}"
                )
            self._pages.append(layer.view(blocks, heads, 2, block_size, width // 2))

    @property
    def dtype(self) -> torch.dtype:
        return self._pages[0].dtype

    def _slots(self, block_ids: Sequence[int], start: int, end: int) -> tuple[torch.Tensor, ...]:
        positions = torch.arange(start, end)
        needed = -(-end // self.block_size)
        if len(block_ids) < needed:
            raise ValueError(f"tokens up to {end} need {needed} blocks, got {len(block_ids)}")
        table = torch.as_tensor(list(block_ids[:needed]), dtype=torch.long)
        return table[positions // self.block_size], positions % self.block_size

    def gather(self, block_ids: Sequence[int], start: int, end: int) -> torch.Tensor:
        """A copy of tokens `[start, end)`'s KV: `[layers, 2, end - start, kv_heads, head_dim]`."""
        blocks, offsets = self._slots(block_ids, start, end)
        # advanced indexes on dims 0 and 3 put the token dim first: [tokens, heads, 2, head_dim]
        return torch.stack(
            [page[blocks, :, :, offsets].permute(2, 0, 1, 3) for page in self._pages]
        )

    def scatter(self, kv: torch.Tensor, block_ids: Sequence[int], start: int) -> None:
        """Write `kv` (`[layers, 2, tokens, kv_heads, head_dim]`) as the tokens from `start` on."""
        _, _, heads, _, head_dim = self._pages[0].shape
        expected = (len(self._pages), 2, kv.shape[2], heads, head_dim)
        if kv.dim() != 5 or tuple(kv.shape) != expected:
            # broadcasting would write one head's KV into every head
            raise ValueError(f"KV of shape {tuple(kv.shape)} does not fit the cache's {expected}")
        blocks, offsets = self._slots(block_ids, start, start + kv.shape[2])
        for page, layer in zip(self._pages, kv):
            page[blocks, :, :, offsets] = layer.permute(1, 2, 0, 3).to(page.dtype)
